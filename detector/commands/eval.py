"""``python -m detector eval ckpt=<file>``: COCO metrics of a checkpoint on the val split; and the
checkpoint checks that ``eval`` and ``infer`` share (a typed ``arch=`` must match the checkpoint's)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

from detector.arch.zoo import resolve_arch
from detector.data.coco import build_dataset
from detector.data.coco_eval import METRIC_NAMES, format_metrics
from detector.engine.checkpoint import check_arch, load_checkpoint
from detector.engine.distributed import autocast_dtype, setup, teardown
from detector.engine.evaluate import EVAL_DETECTIONS_FILE, EVAL_METRICS_FILE, eval_loader, evaluate, model_from_checkpoint
from detector.engine.run_dir import ensure_writable, write_json
from detector.errors import UserError
from detector.output_path import output_folder


def typed_override(key: str, argv: Sequence[str] | None = None) -> str | None:
    """The value of ``key=...`` as typed on the command line (``+key=`` / ``++key=`` too), else None.

    eval and infer take the architecture from the checkpoint; an ``arch=`` the user typed is
    checked against it, while the config's default ``arch`` is not.
    """
    argv = sys.argv[1:] if argv is None else argv
    for item in argv:
        name, sep, value = item.lstrip("+").partition("=")
        if sep and name == key:
            return value
    return None


def _require(cfg: Any, key: str, hint: str) -> str:
    value = cfg.get(key, None)
    if value is None or not str(value).strip():
        raise UserError(f"{key} is not set; {hint}")
    return str(value)


def checked_checkpoint(cfg: Any, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Load ``cfg.ckpt``; refuse it when a typed ``arch=`` names another code."""
    ckpt = _require(cfg, "ckpt", "pass ckpt=<run dir>/last.pt (or final.pt)")
    payload = load_checkpoint(ckpt)
    typed = typed_override("arch", argv)
    if typed is not None:
        check_arch(payload, str(resolve_arch(typed)), source=f"checkpoint {ckpt}")
    return payload


def eval_command(cfg: Any) -> dict[str, float]:
    """``python -m detector eval ckpt=<file>``: COCO metrics of a checkpoint on the val split."""
    payload = checked_checkpoint(cfg)
    out_dir = output_folder(cfg.out if cfg.get("out", None) else Path(str(cfg.ckpt)).expanduser().parent, "out",
                            [EVAL_METRICS_FILE, EVAL_DETECTIONS_FILE])
    ctx = setup(str(cfg.device))
    trained_classes = int(payload["config"]["data"]["num_classes"])
    if int(cfg.data.num_classes) != trained_classes:
        raise UserError(f"the checkpoint predicts {trained_classes} classes but data.num_classes="
                        f"{cfg.data.num_classes}; pass the data config it was trained with (e.g. the same experiment=)")
    model = model_from_checkpoint(payload, ctx.device)
    dataset = build_dataset(cfg.data, "val", train=False, cache_dir=cfg.get("cache_dir", None))
    batch = int(cfg.train.get("eval_batch_size", None) or cfg.train.batch_size)
    max_images = cfg.train.get("max_eval_images", None)
    loader = eval_loader(dataset, batch, int(cfg.train.workers), ctx, max_images)
    amp = autocast_dtype(str(cfg.train.amp), ctx.device)
    try:
        metrics, detections = evaluate(model, loader, ctx, amp, progress=True)
    finally:
        teardown(ctx)
    if not ctx.is_main:
        return metrics
    ensure_writable(out_dir, "out")
    write_json(out_dir / EVAL_DETECTIONS_FILE, detections)
    record = {"arch": str(payload["arch"]), "ckpt": str(cfg.ckpt), "iteration": int(payload["iteration"]),
              "images": len(dataset) if max_images is None else min(len(dataset), int(max_images)), **{name: metrics[name] for name in METRIC_NAMES}}
    write_json(out_dir / EVAL_METRICS_FILE, record)
    print(format_metrics(metrics))
    print(f"wrote {out_dir / EVAL_METRICS_FILE} and {out_dir / EVAL_DETECTIONS_FILE}")
    return metrics
