"""``python -m detector bench arch=<code>``: our detector's throughput beside torchvision's FCOS.

Reads ``arch``, ``device``, ``seed``, ``format`` (text | json), ``recipe`` and the ``bench``
section of the command's own config, ``conf/bench.yaml`` (documented there; the one source of every
bench default: a section given here is laid over it, and a key it lacks is refused with the valid
list); :mod:`detector.bench.throughput` does the measuring. The model is built as it is retrained
(``bench.backbone``, default ResNet-50, frozen BN, stem and stage 1 frozen, ``bench.width`` 256,
``bench.num_classes`` 80) with random weights.

``bench.quick=true`` swaps in tiny sizes and counts (ResNet-18, batch 2, 64-px images): a smoke run
that finishes in seconds on a CPU; its numbers mean nothing.

Text output: one row per variant (train images/s, step time, inference images/s per batch size,
peak training memory, host syncs per training step on CUDA), the ours / torchvision ratios and
the self-check. ``format=json``: one JSON
object (see :func:`detector.bench.throughput.run_bench`). ``cfg`` may also be a plain dict with the same
keys (``recipe`` then a mapping of the recipe's fields), for machines without Hydra.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from detector.cli import CONF_DIR
from detector.engine.distributed import select_device
from detector.fast.switch import parse_paths
from detector.model.recipe import Recipe
from detector.bench.settings import BenchError, BenchSettings
from detector.bench.variants import default_variants, parse_graph_modes
from detector.bench.throughput import run_bench
from detector.arch.zoo import resolve_arch

FORMATS = ("text", "json")
QUICK = dict(batch=2, infer_batches=(1, 2), short_side=64, max_size=96, backbone="resnet18", warmup=1, iters=2,
             infer_warmup=1, infer_iters=2, num_batches=2, boxes_per_image=3)


BENCH_CONFIG = CONF_DIR / "bench.yaml"


def bench_defaults() -> dict[str, Any]:
    """The ``bench`` section of ``conf/bench.yaml``, read with PyYAML (scripts without Hydra use it too)."""
    import yaml

    return dict(yaml.safe_load(BENCH_CONFIG.read_text(encoding="utf-8"))["bench"])


def bench_section(cfg: Any) -> dict[str, Any]:
    """``cfg.bench`` laid over :func:`bench_defaults`; a key the YAML does not have is a BenchError."""
    given = cfg.get("bench", None) or {}
    if not isinstance(given, Mapping) and not hasattr(given, "items"):
        raise BenchError("bench: expected a section of settings (see conf/bench.yaml)")
    defaults = bench_defaults()
    unknown = sorted(str(k) for k in given if k not in defaults)
    if unknown:
        raise BenchError(f"bench.{unknown[0]}: not a bench setting; the settings are {', '.join(defaults)}")
    return {**defaults, **{str(k): v for k, v in given.items()}}


def _as_tuple(value: Any) -> tuple:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip() and v.strip() != "none")
    return tuple(value)


def _optional_name(value: Any) -> str | None:
    """A name, or None for ``none`` / null / empty."""
    text = str(value).strip() if value is not None else ""
    return None if text.lower() in ("", "none", "null") else text


def _switch(value: Any, key: str, on_gpu: bool) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() == "auto":
        return on_gpu
    raise BenchError(f"bench.{key}={value!r}: use auto, true or false")


def settings_from_cfg(cfg: Any) -> tuple[BenchSettings, dict[str, Any]]:
    """(BenchSettings, variant options) from the composed config; BenchError for bad values."""
    bench = bench_section(cfg)
    device = select_device(str(cfg.get("device", "auto")))
    on_gpu = device.type == "cuda"
    precision = str(bench["precision"])
    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"
    try:
        settings = BenchSettings(
            device=str(device), batch=int(bench["batch"]),
            infer_batches=tuple(int(b) for b in bench["infer_batches"]),
            short_side=int(bench["short_side"]), max_size=int(bench["max_size"]),
            boxes_per_image=int(bench["boxes_per_image"]),
            num_classes=int(bench["num_classes"]), width=int(bench["width"]),
            backbone=str(bench["backbone"]), precision=precision,
            channels_last=_switch(bench["channels_last"], "channels_last", on_gpu),
            cudnn_benchmark=bool(bench["cudnn_benchmark"]),
            warmup=int(bench["warmup"]), iters=int(bench["iters"]),
            infer_warmup=int(bench["infer_warmup"]), infer_iters=int(bench["infer_iters"]),
            num_batches=int(bench["num_batches"]), lr=float(bench["lr"]),
            seed=int(cfg.get("seed", 0) or 0), self_check=bool(bench["self_check"]),
            time_limit=float(bench["time_limit"]),
        )
    except (TypeError, ValueError) as err:
        if isinstance(err, BenchError):
            raise
        raise BenchError(f"bench: a setting has a bad value ({err}); see conf/bench.yaml") from None
    if bool(bench["quick"]):
        settings = replace(settings, **QUICK)
    options = {
        "fast_paths": parse_paths(bench["fast_paths"]),
        "deform_impls": _as_tuple(bench["deform_impl"]) or ("torchvision",),
        "compile_": _as_tuple(bench["compile"]),
        "torchvision_layouts": _as_tuple(bench["torchvision"]),
        "ablate": bool(bench["ablate"]),
        "cuda_graph": bench["cuda_graph"],
        "also_arch": _optional_name(bench["also_arch"]),
    }
    parse_graph_modes(options["cuda_graph"])  # BenchError now, before anything is built
    return settings, options


def _number(value: Any, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def format_table(result: dict[str, Any]) -> str:
    """The text report of a :func:`run_bench` result."""
    settings, env = result["settings"], result["environment"]
    sizes = settings["infer_batches"]
    lines = [
        f"bench {result['arch']} (recipe {result['recipe']}) on {env.get('gpu', env['device'])}, torch {env['torch']}, "
        f"torchvision {env['torchvision']}",
        f"batch {settings['batch']}, images {settings['short_side']} x <= {settings['max_size']}, "
        f"{settings['precision']}{' + channels_last' if settings['channels_last'] else ''}, "
        f"median of {settings['iters']} train / {settings['infer_iters']} inference iterations after warm-up",
        "",
    ]
    header = f"{'variant':<56}{'train img/s':>12}{'step ms':>9}" + "".join(
        f"{f'infer b{b} img/s':>17}" for b in sizes) + f"{'peak GB':>9}{'syncs':>7}"
    lines += [header, "-" * len(header)]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"{row['name'][:55]:<56}  {row['error']}")
            continue
        cells = f"{row['name'][:55]:<56}{_number(row.get('train_images_per_s')):>12}{_number(row.get('train_step_ms')):>9}"
        cells += "".join(f"{_number(row.get(f'infer_b{b}_images_per_s')):>17}" for b in sizes)
        cells += f"{_number(row.get('train_peak_memory_gb')):>9}{_number(row.get('train_syncs_per_step'), 0):>7}"
        lines.append(cells)
        if row.get("train_graph_note"):
            lines.append(f"{'':<4}{row['train_graph_note'][:200]}")
    if result.get("ratios"):
        parts = [f"{key.removesuffix('_images_per_s').replace('_', ' ')} {value:.2f}x"
                 for key, value in result["ratios"].items()]
        lines += ["", "ours / torchvision: " + ", ".join(parts)]
    if result.get("arch_ratios"):
        lines += ["train img/s / bench.also_arch row with the same graph mode: "
                  + ", ".join(f"{name} {value:.2f}x" for name, value in result["arch_ratios"].items())]
    check = result.get("self_check")
    if check:
        if "error" in check:
            lines.append(f"self-check FAILED to run: {check['error']}")
        else:
            parts = []
            for p in ("fp32", "bf16"):
                if p in check:
                    c = check[p]
                    text = f"{p}: loss rel diff {c['max_loss_rel_diff']:.1e}, grad rel diff {c['grad_rel_diff']:.1e}"
                    if "fast_bf16_error" in c:
                        text += (f" (vs fp32 gradient: fast {c['fast_bf16_error']:.1e}, "
                                 f"reference {c['reference_bf16_error']:.1e})")
                    parts.append(text)
            det = check["detections"]
            parts.append(f"detections counts {det['counts']}, max score diff {det['max_score_diff']:.1e}")
            if "cuda_graphs" in check:
                graphs = check["cuda_graphs"]
                parts.append(f"CUDA-graph detections {'==' if graphs['equal_to_eager'] else '!='} eager "
                             f"({graphs['graphs']} graphs, {len(graphs['capture_failures'])} capture failures)")
            lines.append(f"self-check fast vs reference ({'ok' if check['ok'] else 'MISMATCH'}): " + "; ".join(parts))
    return "\n".join(lines)


def bench(cfg: Any) -> dict[str, Any]:
    """Run the benchmark described by ``cfg`` (a composed config or a plain dict); returns the result."""
    arch = resolve_arch(str(cfg.get("arch", None)))
    recipe = Recipe.from_cfg(cfg.get("recipe", None))
    settings, options = settings_from_cfg(cfg)
    variants = default_variants(arch, **options)
    started = time.monotonic()

    def progress(message: str) -> None:  # stderr in both formats: a crash's log names the row it was in
        print(f"[bench {time.monotonic() - started:.0f} s] {message}", file=sys.stderr, flush=True)

    return run_bench(arch, recipe, settings, variants, progress=progress)


def bench_command(cfg: Any) -> dict[str, Any]:
    """``python -m detector bench``: print the table (or one JSON object with ``format=json``)."""
    fmt = str(cfg.get("format", "text"))
    if fmt not in FORMATS:
        raise BenchError(f"format={fmt!r}: choose one of {', '.join(FORMATS)}")
    result = bench(cfg)
    print(json.dumps(result) if fmt == "json" else format_table(result))
    return result
