"""Where a training step's time goes: data, backbone, FPN, head, target assignment, loss, optimizer.

Each part is timed on its own (forward + backward where it has one), on the bench's random
COCO-shaped batches and model (detector/bench/throughput.py: ResNet-50, frozen BN, batch 16,
800 x <= 1333, bf16 autocast + channels_last on CUDA), median of ``--iters`` after warm-up:

- ``data: h2d float32`` / ``data: h2d uint8``: copying the batch's images from pinned host memory
  (float32 is what the loader hands over today; uint8 is 4x fewer bytes);
- ``preprocess``: normalise + pad on the device;
- ``backbone`` / ``fpn`` / ``head``: forward + backward with random output gradients, inputs
  that need gradients where the real step has them;
- ``targets``: target assignment alone (forward only);
- ``loss``: the loss (target assignment included) forward + backward from the head outputs;
- ``optimizer``: SGD momentum step over the trainable parameters;
- ``full step``: the real train step; ``other`` = full step - the model parts (launch gaps,
  syncs, what the parts do not isolate).

torchvision's FCOS gets the same treatment where its structure allows (transform, backbone+FPN,
head, loss). ``--profiler`` adds torch.profiler's top CUDA kernels of three full steps per row.

    python experiments/profile_breakdown.py --device cuda --arch fcos nasfcos --out $OUT/profile
    python experiments/profile_breakdown.py --device cpu --quick      # a smoke run

Needs torch, torchvision and PyYAML only (no Hydra).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from detector.fast.loss import SizeRangeCache  # noqa: E402
from detector.fast.switch import active_fast_paths, parse_paths  # noqa: E402
from detector.model.targets import assign_targets  # noqa: E402
from detector.bench.settings import BenchSettings, Variant
from detector.bench.models import build_ours, build_torchvision_fcos, load_recipe
from detector.bench.batches import make_batches
from detector.bench.timing import time_calls
from detector.arch.zoo import resolve_arch  # noqa: E402

QUICK = dict(batch=2, infer_batches=(1, 2), short_side=64, max_size=96, backbone="resnet18", num_batches=2,
             boxes_per_image=3)


def median_ms(step: Callable[[int], Any], device: torch.device, warmup: int, iters: int) -> float:
    return statistics.median(time_calls(step, device, warmup, iters))


def _grads_like(tensors: list[torch.Tensor], scale: float = 1e-3) -> list[torch.Tensor]:
    return [torch.randn_like(t) * scale for t in tensors]


def ours_breakdown(arch_name: str, recipe_name: str, paths: tuple[str, ...], deform_impl: str,
                   settings: BenchSettings, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Per-part milliseconds of our detector's train step."""
    arch, recipe = resolve_arch(arch_name), load_recipe(recipe_name)
    model = build_ours(arch, recipe, settings, Variant(name="profile", fast_paths=paths, deform_impl=deform_impl),
                       device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    batches = make_batches(settings, device)
    batch = batches[0]
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=settings.precision == "bf16")
    times: dict[str, float] = {}
    warm, iters = args.warmup, args.iters

    pinned_f32 = [img.cpu() for img in batch.images]
    pinned_u8 = [(img * 255).to(torch.uint8).cpu() for img in batch.images]
    if device.type == "cuda":
        pinned_f32 = [t.pin_memory() for t in pinned_f32]
        pinned_u8 = [t.pin_memory() for t in pinned_u8]
    times["data: h2d float32"] = median_ms(lambda i: [t.to(device, non_blocking=True) for t in pinned_f32],
                                           device, warm, iters)
    times["data: h2d uint8"] = median_ms(lambda i: [t.to(device, non_blocking=True) for t in pinned_u8],
                                         device, warm, iters)
    times["preprocess"] = median_ms(lambda i: model.preprocess(batch.images), device, warm, iters)

    padded, _ = model.preprocess(batch.images)  # (N, 3, H, W)
    with torch.autocast(**amp):
        feats = model.backbone(padded)
        pyramid = model.fpn({k: v.detach() for k, v in feats.items()})
        head_out = model.head([p.detach() for p in pyramid])
    feat_grads = _grads_like(list(feats.values()))
    pyramid_grads = _grads_like(pyramid)
    head_keys = list(head_out)
    head_grads = {k: _grads_like(head_out[k]) for k in head_keys}

    def backbone_step(i: int) -> None:
        with torch.autocast(**amp):
            out = model.backbone(padded)
        torch.autograd.backward(list(out.values()), feat_grads)

    fpn_inputs = {k: v.detach().requires_grad_() for k, v in feats.items()}

    def fpn_step(i: int) -> None:
        with torch.autocast(**amp):
            out = model.fpn(fpn_inputs)
        torch.autograd.backward(out, pyramid_grads)

    head_inputs = [p.detach().requires_grad_() for p in pyramid]

    def head_step(i: int) -> None:
        with torch.autocast(**amp):
            out = model.head(head_inputs)
        torch.autograd.backward([t for k in head_keys for t in out[k]], [g for k in head_keys for g in head_grads[k]])

    points = model.points(pyramid)
    ranges = SizeRangeCache().get(recipe, device) if "losses" in paths else None
    loss_inputs = {k: [t.detach().requires_grad_() for t in v] for k, v in head_out.items()}

    def loss_step(i: int) -> None:
        with torch.autocast(**amp):
            losses = model.loss_impl(loss_inputs, points, batch.targets, recipe, settings.num_classes)
        sum(losses.values()).backward()

    times["backbone"] = median_ms(backbone_step, device, warm, iters)
    times["fpn"] = median_ms(fpn_step, device, warm, iters)
    times["head"] = median_ms(head_step, device, warm, iters)
    times["targets"] = median_ms(lambda i: assign_targets(points, batch.targets, recipe, ranges), device, warm, iters)
    times["loss"] = median_ms(loss_step, device, warm, iters)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=0.9, weight_decay=1e-4)
    for p in params:
        if p.grad is None:
            p.grad = torch.randn_like(p) * 1e-6
    times["optimizer"] = median_ms(lambda i: optimizer.step(), device, warm, iters)

    def full_step(i: int) -> None:
        b = batches[i % len(batches)]
        with torch.autocast(**amp):
            losses = model(b.images, b.targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    times["full step"] = median_ms(full_step, device, warm, iters)
    parts = ("preprocess", "backbone", "fpn", "head", "loss", "optimizer")
    times["other"] = times["full step"] - sum(times[p] for p in parts)
    row = {"model": "ours", "arch": arch_name, "recipe": recipe_name, "fast_paths": list(active_fast_paths(model)),
           "deform_impl": deform_impl, "ms": times}
    if args.profiler:
        row["top_kernels"] = top_kernels(full_step, device, args.top)
    return row


def torchvision_breakdown(recipe_name: str, settings: BenchSettings, args: argparse.Namespace,
                          device: torch.device) -> dict[str, Any]:
    """torchvision FCOS: transform, backbone+FPN, head, loss (matching included), full step."""
    recipe = load_recipe(recipe_name)
    model = build_torchvision_fcos(recipe, settings, "frozen_bn", device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    batches = make_batches(settings, device)
    batch = batches[0]
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=settings.precision == "bf16")
    warm, iters = args.warmup, args.iters
    times: dict[str, float] = {}
    times["preprocess"] = median_ms(lambda i: model.transform(batch.images, batch.targets), device, warm, iters)
    images_t, targets_t = model.transform(batch.images, batch.targets)
    with torch.autocast(**amp):
        features = list(model.backbone(images_t.tensors).values())
        head_out = model.head([f.detach() for f in features])
    feature_grads = _grads_like(features)
    head_keys = list(head_out)
    head_grads = [torch.randn_like(head_out[k]) * 1e-3 for k in head_keys]

    def backbone_step(i: int) -> None:
        with torch.autocast(**amp):
            out = list(model.backbone(images_t.tensors).values())
        torch.autograd.backward(out, feature_grads)

    head_inputs = [f.detach().requires_grad_() for f in features]

    def head_step(i: int) -> None:
        with torch.autocast(**amp):
            out = model.head(head_inputs)
        torch.autograd.backward([out[k] for k in head_keys], head_grads)

    anchors = model.anchor_generator(images_t, features)
    num_per_level = [f.size(2) * f.size(3) for f in features]
    loss_inputs = {k: v.detach().requires_grad_() for k, v in head_out.items()}

    def loss_step(i: int) -> None:
        with torch.autocast(**amp):
            losses = model.compute_loss(targets_t, loss_inputs, anchors, num_per_level)
        sum(losses.values()).backward()

    times["backbone+fpn"] = median_ms(backbone_step, device, warm, iters)
    times["head"] = median_ms(head_step, device, warm, iters)
    times["loss"] = median_ms(loss_step, device, warm, iters)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=0.9, weight_decay=1e-4)

    def full_step(i: int) -> None:
        b = batches[i % len(batches)]
        with torch.autocast(**amp):
            losses = model(b.images, b.targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    times["full step"] = median_ms(full_step, device, warm, iters)
    times["optimizer"] = median_ms(lambda i: optimizer.step(), device, warm, iters)
    times["other"] = times["full step"] - sum(times[p] for p in ("preprocess", "backbone+fpn", "head", "loss", "optimizer"))
    row = {"model": "torchvision", "recipe": recipe_name, "ms": times}
    if args.profiler:
        row["top_kernels"] = top_kernels(full_step, device, args.top)
    return row


def top_kernels(step: Callable[[int], Any], device: torch.device, top: int) -> str:
    """torch.profiler table of the most expensive device kernels over three steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step(0)
    with profile(activities=activities) as prof:
        for i in range(3):
            step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    averages = prof.key_averages()
    for key in (("self_cuda_time_total", "self_device_time_total") if device.type == "cuda" else ("self_cpu_time_total",)):
        try:
            return averages.table(sort_by=key, row_limit=top)
        except (AttributeError, KeyError, ValueError):
            continue
    return averages.table(row_limit=top)


def format_rows(rows: list[dict[str, Any]]) -> str:
    names: list[str] = []
    for row in rows:
        names += [k for k in row.get("ms", {}) if k not in names]
    labels = [f"{r['model']} {r.get('arch', '')} {'+'.join(r.get('fast_paths', [])) or ('ref' if r['model'] == 'ours' else '')}"
              f"{' dcn=' + r['deform_impl'] if r.get('deform_impl') and 'dcn' in str(resolve_arch(r['arch'])) else ''}"
              for r in rows]
    lines = ["milliseconds per step (median); columns: " + " | ".join(f"[{i}] {label.strip()}" for i, label in enumerate(labels))]
    lines.append(f"{'part':<20}" + "".join(f"{f'[{i}]':>12}" for i in range(len(rows))))
    for name in names:
        cells = "".join(f"{r['ms'][name]:>12.2f}" if name in r.get("ms", {}) else f"{'-':>12}" for r in rows)
        lines.append(f"{name:<20}{cells}")
    for i, row in enumerate(rows):
        if "error" in row:
            lines.append(f"[{i}] failed: {row['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--arch", nargs="+", default=["fcos"], help="zoo names or codes")
    parser.add_argument("--recipe", default="nasfcos", help="conf/recipe/<name>.yaml")
    parser.add_argument("--fast-paths", nargs="+", default=["none", "all"],
                        help="one breakdown per entry: none | all | comma-separated names")
    parser.add_argument("--deform-impl", default="fast", help="DCN kernel for archs with dcn ops")
    parser.add_argument("--torchvision", action="store_true", help="add torchvision's FCOS breakdown")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--profiler", action="store_true", help="add torch.profiler's top kernels per row")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default: bf16 on CUDA")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--out", default=None, help="folder for breakdown.json / breakdown.txt")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no GPU is visible; use --device cpu", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    settings = BenchSettings(device=str(device), precision=args.precision or ("bf16" if cuda else "fp32"),
                             channels_last=cuda)
    if args.quick:
        settings = replace(settings, **QUICK)
    torch.backends.cudnn.benchmark = True
    rows = []
    for arch in args.arch:
        for paths in args.fast_paths:
            try:
                rows.append(ours_breakdown(arch, args.recipe, parse_paths(paths), args.deform_impl, settings, args, device))
            except Exception as err:  # one failing row must not hide the others
                rows.append({"model": "ours", "arch": arch, "fast_paths": list(parse_paths(paths)),
                             "error": f"{type(err).__name__}: {str(err).strip()[:300]}"})
            if cuda:
                torch.cuda.empty_cache()
    if args.torchvision:
        try:
            rows.append(torchvision_breakdown(args.recipe, settings, args, device))
        except Exception as err:
            rows.append({"model": "torchvision", "error": f"{type(err).__name__}: {str(err).strip()[:300]}"})
    table = format_rows(rows)
    print(table)
    for row in rows:
        if row.get("top_kernels"):
            print(f"\n{row['model']} {row.get('arch', '')} {row.get('fast_paths', '')}\n{row['top_kernels']}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "breakdown.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))
        (out / "breakdown.txt").write_text(table + "\n" + "\n".join(
            f"\n{r['model']} {r.get('arch', '')} {r.get('fast_paths', '')}\n{r['top_kernels']}"
            for r in rows if r.get("top_kernels")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
