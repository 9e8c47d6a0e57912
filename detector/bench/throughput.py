"""Training and inference throughput of our detector and of torchvision's FCOS, measured alike.

The driver of ``python -m detector bench`` (:mod:`detector.commands.bench` is its thin CLI); the
bench package imports neither Hydra nor OmegaConf. Its pieces: :mod:`detector.bench.settings`
(settings, rows), :mod:`~detector.bench.batches`, :mod:`~detector.bench.models`,
:mod:`~detector.bench.timing`, :mod:`~detector.bench.variants`. :func:`run_bench` takes a :class:`BenchSettings` and a list
of :class:`Variant` rows, builds each model on the device in turn, and on the same random
COCO-shaped batches measures

- training: forward (losses) + backward + SGD step, ``images / median step time``;
- inference: eval-mode forward including post-processing, at each batch size of
  ``infer_batches`` (``images / median call time``);
- peak device memory of training.

A row with ``cuda_graph`` trains with the network part of the step (backbone + FPN + head, forward
and backward) replayed from a CUDA graph (:mod:`detector.fast.graphs.training`), batches zero-padded to
one shape (:func:`train_graph_pad_to`); a row with ``arch`` measures that architecture instead of
the bench's (``bench.also_arch``: nasfcos and our fcos in one process, :func:`arch_ratios`).

Timing follows the usual rules: warm-up iterations first (cudnn autotuning, Triton compilation and
``torch.compile`` happen there), then per-iteration CUDA events (host clock on CPU), median of the
timed iterations. Both models get the same precision (bf16 autocast and channels_last by default
on CUDA) and the same batches, which stay on the device, so host-to-device copies and data loading
are not part of these numbers (experiments/bench_loader.py measures the loader).

The torchvision reference is ``torchvision.models.detection.FCOS`` on a torchvision ResNet with
its ``_resnet_fpn_extractor``, built as ``fcos_resnet50_fpn`` builds it for training from ImageNet
weights (frozen BatchNorm, ``trainable_backbone_layers=3``) but with random weights:
``torchvision="frozen_bn"``, the same layout as our detector. ``torchvision="bn"`` is what
``fcos_resnet50_fpn(weights=None, weights_backbone=None)`` builds (same construction, for any
ResNet): plain BatchNorm and all five stages trainable, a different and slower model. Its
post-processing uses the recipe's thresholds, as ours does.
"""
from __future__ import annotations

import time
from dataclasses import asdict, replace
from typing import Any, Callable

import torch

from detector.arch.grammar import Arch
from detector.errors import UserError
from detector.fast.check import check_fast_paths
from detector.fast.switch import active_fast_paths
from detector.fast.graphs.training import install_training_graph
from detector.model.recipe import Recipe
from detector.arch.zoo import resolve_arch
from detector.bench.batches import make_batches
from detector.bench.models import build_ours, build_torchvision_fcos, prepare_model
from detector.bench.settings import Batch, BenchSettings, Variant
from detector.bench.timing import environment, measure_inference, measure_training, release, train_graph_pad_to
from detector.bench.variants import check_variants


def measure_variant(variant: Variant, arch: Arch, recipe: Recipe, settings: BenchSettings, batches: list[Batch],
                    device: torch.device, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build the variant's model, measure it, release it; the row's numbers (or its error).
    ``progress`` hears each phase (inference per batch size, training) as it starts."""
    row: dict[str, Any] = {"name": variant.name, "model": variant.model}
    say = progress or (lambda message: None)
    try:
        if variant.model == "torchvision":
            row["layout"] = variant.torchvision_layout
            model = build_torchvision_fcos(recipe, settings, variant.torchvision_layout, device)
        else:
            row_arch = resolve_arch(variant.arch) if variant.arch else arch
            model = build_ours(row_arch, recipe, settings, variant, device)
            row.update(arch=str(row_arch), fast_paths=list(active_fast_paths(model)),
                       deform_impl=variant.deform_impl, compile=list(variant.compile), cuda_graph=variant.cuda_graph,
                       reference_arch=variant.arch is not None)
        model = prepare_model(model, settings)
        started = time.perf_counter()
        if variant.infer:
            for size in settings.infer_batches:
                say(f"{variant.name}: inference, batch {size}")
                row.update(measure_inference(model, batches, settings, size, device))
        if variant.train:
            if getattr(model, "graphs", None) is not None:  # free the inference graphs' memory pool
                row["graph_capture_failures"] = sorted(set(model.graphs.failures.values()))
                model.graphs = type(model.graphs)()
                release(device)
            graphs = install_training_graph(model, pad_to=train_graph_pad_to(settings)) if variant.cuda_graph else None
            say(f"{variant.name}: training{' (CUDA-graph step)' if graphs is not None else ''}")
            row.update(measure_training(model, batches, settings, device))
            if graphs is not None:
                row["train_graph"] = {"pad_to": list(graphs.pad_to), "captures": graphs.captures,
                                      "failures": sorted(set(graphs.failures.values()))}
                if graphs.failures or not graphs.captures:  # eager in effect: say so in the table
                    row["train_graph_note"] = "not graphed: " + ("; ".join(row["train_graph"]["failures"])
                                                                  or "never applied (CPU?)")
                graphs.clear()  # drop the graph's pool now, not whenever the collector breaks the cycle
        row["seconds"] = time.perf_counter() - started
    except UserError:
        raise
    except Exception as err:  # one failing row (OOM, a kernel that does not compile) must not hide the others
        row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
    finally:
        model = None
        release(device)
    return row


def run_bench(arch: Arch, recipe: Recipe, settings: BenchSettings, variants: list[Variant],
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every variant on the same batches; returns ``{"settings", "environment", "rows",
    "ratios", "self_check"}`` (ratios: first ours row over the first torchvision row)."""
    check_variants(settings, variants)
    device = torch.device(settings.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = settings.cudnn_benchmark
    batches = make_batches(settings, device)
    result: dict[str, Any] = {"arch": str(arch), "recipe": recipe.name, "settings": asdict(settings),
                              "environment": environment(device), "rows": []}
    started = time.perf_counter()
    for variant in variants:
        if settings.time_limit and time.perf_counter() - started > settings.time_limit:
            result["rows"].append({"name": variant.name, "model": variant.model,
                                   "error": f"skipped: past bench.time_limit={settings.time_limit:g} s"})
            continue
        if progress:
            progress(f"measuring {variant.name}")
        result["rows"].append(measure_variant(variant, arch, recipe, settings, batches, device, progress))
    result["ratios"] = ratios(result["rows"])
    if any(row.get("reference_arch") for row in result["rows"]):
        result["arch_ratios"] = arch_ratios(result["rows"])
    if settings.self_check:
        first_ours = next((v for v in variants if v.model == "ours" and v.fast_paths), None)
        if first_ours is not None:
            if progress:
                progress(f"self-check of {first_ours.name}")
            result["self_check"] = run_self_check(first_ours, arch, recipe, settings, batches[0], device)
    result["seconds"] = time.perf_counter() - started
    return result


def run_self_check(variant: Variant, arch: Arch, recipe: Recipe, settings: BenchSettings, batch: Batch,
                   device: torch.device) -> dict[str, Any]:
    try:
        model = prepare_model(build_ours(arch, recipe, settings, replace(variant, compile=()), device), settings)
        precisions = ("fp32", "bf16") if settings.precision == "bf16" else ("fp32",)
        return check_fast_paths(model, batch.images, batch.targets, precisions)
    except UserError:
        raise
    except Exception as err:  # reported in the result, like a failing row
        return {"ok": False, "error": f"{type(err).__name__}: {str(err).strip()[:300]}"}
    finally:
        release(device)


RATIO_KEYS = ("train_images_per_s", "infer_b1_images_per_s", "infer_b8_images_per_s")


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Ours / torchvision for each throughput key both rows have (first row of each kind; none
    when either of those two rows failed)."""
    ours = next((r for r in rows if r["model"] == "ours"), None)
    theirs = next((r for r in rows if r["model"] == "torchvision"), None)
    if ours is None or theirs is None or "error" in ours or "error" in theirs:
        return {}
    keys = [k for k in ours if k.endswith("_images_per_s") and k in theirs]
    return {k: ours[k] / theirs[k] for k in keys}


def arch_ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Training images/s of each bench-arch row of ours over the ``bench.also_arch`` row with the
    same ``cuda_graph`` setting (the issue-#9 ratio, e.g. nasfcos / fcos), keyed by row name."""
    reference = {r["cuda_graph"]: r for r in rows if r.get("reference_arch") and "train_images_per_s" in r}
    out = {}
    for row in rows:
        if row.get("model") != "ours" or row.get("reference_arch") or "train_images_per_s" not in row:
            continue
        other = reference.get(row.get("cuda_graph"))
        if other is not None:
            out[row["name"]] = row["train_images_per_s"] / other["train_images_per_s"]
    return out
