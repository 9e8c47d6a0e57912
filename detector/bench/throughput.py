"""Training and inference throughput of our detector and of torchvision's FCOS, measured alike.

The measuring core of ``python -m detector bench`` (:mod:`detector.commands.bench` is its thin CLI); it
imports neither Hydra nor OmegaConf. :func:`run_bench` takes a :class:`BenchSettings` and a list
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

import gc
import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision
from torch import Tensor, nn

from detector.arch.grammar import Arch
from detector.model.build import build_detector
from detector.model.deform import DEFORM_IMPLS
from detector.errors import UserError
from detector.fast.check import check_fast_paths
from detector.fast.switch import (COMPILE_PARTS, FAST_PATHS, active_fast_paths, compile_parts, parse_paths,
                                 set_fast_paths)
from detector.model.fcos import FCOS
from detector.fast.graphs.training import install_training_graph
from detector.model.recipe import Recipe
from detector.arch.zoo import resolve_arch

TORCHVISION_LAYOUTS = ("frozen_bn", "bn", "none")
PRECISIONS = ("bf16", "fp32")
TORCHVISION_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
GB = 1e9


class BenchError(UserError):
    """A bench setting is out of range."""


@dataclass(frozen=True)
class BenchSettings:
    """What to measure and how. Sizes follow COCO training: short side 800, long side <= 1333."""

    device: str = "cuda"
    batch: int = 16
    infer_batches: tuple[int, ...] = (1, 8)
    short_side: int = 800
    max_size: int = 1333
    boxes_per_image: int = 7
    num_classes: int = 80
    width: int = 256
    backbone: str = "resnet50"
    precision: str = "bf16"
    channels_last: bool = True
    cudnn_benchmark: bool = True
    warmup: int = 5
    iters: int = 20
    infer_warmup: int = 8
    infer_iters: int = 24
    num_batches: int = 4
    lr: float = 1e-3
    seed: int = 0
    self_check: bool = True
    time_limit: float = 0.0  # seconds; rows starting later are skipped (0 = no limit)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise BenchError(f"bench.precision={self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        positive = {"batch": self.batch, "iters": self.iters, "infer_iters": self.infer_iters,
                    "num_batches": self.num_batches, "short_side": self.short_side, "width": self.width,
                    "num_classes": self.num_classes, "boxes_per_image": self.boxes_per_image}
        bad = [f"{k}={v}" for k, v in positive.items() if int(v) < 1]
        if bad or self.warmup < 0 or self.infer_warmup < 0:
            raise BenchError(f"bench: {', '.join(bad) or 'warmup'} must be positive (warmup >= 0)")
        if self.max_size < self.short_side:
            raise BenchError(f"bench: max_size={self.max_size} is smaller than short_side={self.short_side}")
        if any(b < 1 or b > self.batch for b in self.infer_batches):
            raise BenchError(f"bench.infer_batches={list(self.infer_batches)}: each must be in 1..batch ({self.batch})")


@dataclass(frozen=True)
class Variant:
    """One row of the table: which model, with which code paths."""

    name: str
    model: str = "ours"  # ours | torchvision
    fast_paths: tuple[str, ...] = FAST_PATHS
    deform_impl: str = "torchvision"
    compile: tuple[str, ...] = ()
    torchvision_layout: str = "frozen_bn"
    train: bool = True
    infer: bool = True
    cuda_graph: bool = False  # ours: training step's network part replayed from a CUDA graph
    arch: str | None = None  # ours: this architecture instead of the bench's (bench.also_arch)


@dataclass
class Batch:
    images: list[Tensor]  # (3, H_i, W_i) RGB in 0..1 on the device
    targets: list[dict[str, Tensor]]  # boxes (K, 4) xyxy pixels, labels (K,)


# ---------------------------------------------------------------------------------------------- data


def make_batches(settings: BenchSettings, device: torch.device) -> list[Batch]:
    """``num_batches`` random batches: landscape images with short side ``short_side`` and long side
    uniform in [1.25 * short, max_size]; ``boxes_per_image`` +- 3 boxes, log-uniform sizes."""
    gen = torch.Generator().manual_seed(settings.seed)
    device_gen = torch.Generator(device=device).manual_seed(settings.seed)
    short, longest = settings.short_side, settings.max_size
    low_long = min(int(round(1.25 * short)), longest)
    batches = []
    for _ in range(settings.num_batches):
        images, targets = [], []
        for _ in range(settings.batch):
            width = int(torch.randint(low_long, longest + 1, (), generator=gen))
            images.append(torch.rand(3, short, width, generator=device_gen, device=device))
            targets.append({k: v.to(device) for k, v in _random_boxes(settings, short, width, gen).items()})
        batches.append(Batch(images, targets))
    return batches


def _random_boxes(settings: BenchSettings, height: int, width: int, gen: torch.Generator) -> dict[str, Tensor]:
    spread = min(3, settings.boxes_per_image - 1)
    count = int(torch.randint(settings.boxes_per_image - spread, settings.boxes_per_image + spread + 1, (),
                              generator=gen))
    smallest, largest = max(4.0, height / 50), 0.8 * height
    side = torch.exp(math.log(smallest) + torch.rand(count, generator=gen) * math.log(largest / smallest))
    aspect = torch.exp((torch.rand(count, generator=gen) * 2 - 1) * math.log(2.0)).sqrt()
    box_w = (side * aspect).clamp(2.0, width - 1.0)
    box_h = (side / aspect).clamp(2.0, height - 1.0)
    x1 = torch.rand(count, generator=gen) * (width - box_w)
    y1 = torch.rand(count, generator=gen) * (height - box_h)
    boxes = torch.stack([x1, y1, x1 + box_w, y1 + box_h], dim=1)  # (K, 4)
    labels = torch.randint(0, settings.num_classes, (count,), generator=gen)
    return {"boxes": boxes, "labels": labels}


# -------------------------------------------------------------------------------------------- models


def load_recipe(name: str) -> Recipe:
    """``conf/recipe/<name>.yaml`` as a Recipe, read with PyYAML (for scripts without Hydra)."""
    import yaml

    path = Path(__file__).resolve().parents[2] / "conf" / "recipe" / f"{name}.yaml"
    if not path.is_file():
        raise BenchError(f"recipe '{name}': no file {path}; choose one of "
                         f"{', '.join(sorted(p.stem for p in path.parent.glob('*.yaml')))}")
    return Recipe.from_cfg(yaml.safe_load(path.read_text(encoding="utf-8")))


def build_ours(arch: Arch, recipe: Recipe, settings: BenchSettings, variant: Variant, device: torch.device) -> FCOS:
    """Our detector as retrained: random weights, frozen BN, stem + stage 1 frozen."""
    torch.manual_seed(settings.seed)
    model = build_detector(arch, settings.num_classes, recipe, settings.backbone, "none", settings.width,
                           frozen_stages=1, norm="frozen_bn").to(device)
    set_fast_paths(model, variant.fast_paths, deform=variant.deform_impl)
    compile_parts(model, variant.compile)
    return model


def build_torchvision_fcos(recipe: Recipe, settings: BenchSettings, layout: str, device: torch.device) -> nn.Module:
    """torchvision's FCOS with the recipe's inference thresholds (see the module doc for ``layout``)."""
    from torchvision.models.detection import FCOS as TorchvisionFCOS
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    if settings.backbone not in TORCHVISION_BACKBONES:
        raise BenchError(f"bench: the torchvision reference needs a ResNet backbone ({', '.join(TORCHVISION_BACKBONES)}), "
                         f"got {settings.backbone}; pass bench.torchvision=none")
    torch.manual_seed(settings.seed)
    options = dict(min_size=settings.short_side, max_size=settings.max_size, score_thresh=recipe.score_thresh,
                   nms_thresh=recipe.nms_thresh, detections_per_img=recipe.detections_per_image,
                   topk_candidates=recipe.topk_per_level)
    # fcos_resnet50_fpn's own construction: with backbone weights FrozenBatchNorm2d and 3 trainable
    # stages, without (weights=None, weights_backbone=None) BatchNorm2d and all 5 stages trainable
    norm, trainable = (FrozenBatchNorm2d, 3) if layout == "frozen_bn" else (nn.BatchNorm2d, 5)
    resnet = getattr(torchvision.models, settings.backbone)(weights=None, norm_layer=norm)
    body = _resnet_fpn_extractor(resnet, trainable, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    return TorchvisionFCOS(body, settings.num_classes, **options).to(device)


# ------------------------------------------------------------------------------------------- timing


def train_graph_pad_to(settings: BenchSettings) -> tuple[int, int]:
    """The one padded shape of the bench's training batches (landscape, padded to 32): the graphed
    rows pad every batch to it, so one graph serves them all."""
    return math.ceil(settings.short_side / 32) * 32, math.ceil(settings.max_size / 32) * 32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(step: Callable[[int], Any], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of ``iters`` calls ``step(i)`` after ``warmup`` calls (events on CUDA)."""
    for i in range(warmup):
        step(i)
    synchronize(device)
    if device.type != "cuda":
        times = []
        for i in range(iters):
            start = time.perf_counter()
            step(warmup + i)
            times.append((time.perf_counter() - start) * 1000.0)
        return times
    events = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(warmup + i)
        end.record()
        events.append((start, end))
    synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def count_syncs(fn: Callable[[], Any], device: torch.device) -> int | None:
    """How many synchronizing CUDA calls ``fn`` makes (torch.cuda's sync debug mode); None off CUDA."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _autocast(settings: BenchSettings, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.precision == "bf16")


def _prepare(model: nn.Module, settings: BenchSettings) -> nn.Module:
    return model.to(memory_format=torch.channels_last) if settings.channels_last else model


def measure_training(model: nn.Module, batches: list[Batch], settings: BenchSettings,
                     device: torch.device) -> dict[str, float]:
    """Train-step throughput and peak memory of ``model`` (train mode, SGD momentum 0.9)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=0.9, weight_decay=1e-4)
    last: dict[str, Tensor] = {}

    def step(i: int) -> None:
        batch = batches[i % len(batches)]
        with _autocast(settings, device):
            losses = model(batch.images, batch.targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        last["loss"] = loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_calls(step, device, settings.warmup, settings.iters)
    median = statistics.median(times)
    result = {
        "train_images_per_s": settings.batch * 1000.0 / median,
        "train_step_ms": median,
        "train_step_ms_spread": max(times) - min(times),
        "final_loss": float(last["loss"]),
    }
    if device.type == "cuda":
        result["train_peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / GB
        result["train_syncs_per_step"] = count_syncs(lambda: step(0), device)
    optimizer.zero_grad(set_to_none=True)
    return result


def measure_inference(model: nn.Module, batches: list[Batch], settings: BenchSettings, batch_size: int,
                      device: torch.device) -> dict[str, float]:
    """Eval-mode throughput (forward + post-processing) at ``batch_size`` images per call."""
    model.eval()
    if batch_size == 1:  # a fixed set of single images, each its own size
        inputs = [[batches[i % len(batches)].images[i // len(batches)]] for i in range(min(8, settings.batch * len(batches)))]
    else:
        inputs = [b.images[:batch_size] for b in batches]

    def step(i: int) -> None:
        with torch.inference_mode(), _autocast(settings, device):
            model(inputs[i % len(inputs)])

    times = time_calls(step, device, max(settings.infer_warmup, len(inputs)), settings.infer_iters)
    median = statistics.median(times)
    result = {f"infer_b{batch_size}_images_per_s": batch_size * 1000.0 / median, f"infer_b{batch_size}_ms": median}
    if device.type == "cuda":
        result[f"infer_b{batch_size}_syncs"] = count_syncs(lambda: step(0), device)
    return result


# ------------------------------------------------------------------------------------------- driver


def environment(device: torch.device) -> dict[str, Any]:
    info = {"torch": torch.__version__, "torchvision": torchvision.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
        model = _prepare(model, settings)
        started = time.perf_counter()
        if variant.infer:
            for size in settings.infer_batches:
                say(f"{variant.name}: inference, batch {size}")
                row.update(measure_inference(model, batches, settings, size, device))
        if variant.train:
            if getattr(model, "graphs", None) is not None:  # free the inference graphs' memory pool
                row["graph_capture_failures"] = sorted(set(model.graphs.failures.values()))
                model.graphs = type(model.graphs)()
                _release(device)
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
        _release(device)
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


def check_variants(settings: BenchSettings, variants: list[Variant]) -> None:
    """BenchError before anything is measured when a row cannot be built with these settings."""
    for variant in variants:
        if variant.model != "torchvision":
            continue
        if settings.backbone not in TORCHVISION_BACKBONES:
            raise BenchError(f"bench: the torchvision reference needs a ResNet backbone "
                             f"({', '.join(TORCHVISION_BACKBONES)}), got {settings.backbone}; pass bench.torchvision=none")


def run_self_check(variant: Variant, arch: Arch, recipe: Recipe, settings: BenchSettings, batch: Batch,
                   device: torch.device) -> dict[str, Any]:
    try:
        model = _prepare(build_ours(arch, recipe, settings, replace(variant, compile=()), device), settings)
        precisions = ("fp32", "bf16") if settings.precision == "bf16" else ("fp32",)
        return check_fast_paths(model, batch.images, batch.targets, precisions)
    except UserError:
        raise
    except Exception as err:  # reported in the result, like a failing row
        return {"ok": False, "error": f"{type(err).__name__}: {str(err).strip()[:300]}"}
    finally:
        _release(device)


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


GRAPH_MODES = {"false": (False,), "true": (True,), "both": (False, True)}


def parse_graph_modes(value: Any) -> tuple[bool, ...]:
    """``bench.cuda_graph``: false | true | both -> the cuda_graph settings of ours' rows."""
    text = str(value).strip().lower()
    if text not in GRAPH_MODES:
        raise BenchError(f"bench.cuda_graph={value!r}: use false, true or both (eager and graphed rows)")
    return GRAPH_MODES[text]


def cumulative_ablation(deform_impl: str) -> list[Variant]:
    """Ours with the fast paths added one at a time (reference first), for the change log."""
    steps = [("reference", ()), ("+losses+points", ("losses", "points")),
             ("+frozen_bn", ("losses", "points", "frozen_bn")),
             ("+group_norm", ("losses", "points", "frozen_bn", "group_norm")),
             ("+postprocess", ("losses", "points", "frozen_bn", "group_norm", "postprocess")),
             ("+resize+cat_reduce", ("losses", "points", "frozen_bn", "group_norm", "postprocess", "resize",
                                     "cat_reduce")),
             ("+cuda_graphs (all)", FAST_PATHS)]
    suffix = "" if deform_impl == "torchvision" else f" (dcn={deform_impl})"
    return [Variant(name=f"ours {label}{suffix}", fast_paths=tuple(paths), deform_impl=deform_impl)
            for label, paths in steps]


def default_variants(arch: Arch, fast_paths: str | tuple[str, ...] = FAST_PATHS,
                     deform_impls: tuple[str, ...] = ("fast",), compile_: tuple[str, ...] = (),
                     torchvision_layouts: tuple[str, ...] = ("frozen_bn",), ablate: bool = False,
                     cuda_graph: Any = "false", also_arch: str | None = None) -> list[Variant]:
    """torchvision first (one row per layout; ``none`` for no reference), then ours once per DCN
    kernel (once when the arch has no DCN) and per ``cuda_graph`` mode (false | true | both: eager,
    graphed training step, or both), then the same for ``also_arch`` (None: none), then the ablation."""
    bad = [layout for layout in torchvision_layouts if layout not in TORCHVISION_LAYOUTS]
    if bad:
        raise BenchError(f"bench.torchvision={list(torchvision_layouts)}: choose among {', '.join(TORCHVISION_LAYOUTS)}")
    unknown_impls = [impl for impl in deform_impls if impl not in DEFORM_IMPLS]
    if unknown_impls:
        raise BenchError(f"bench.deform_impl={list(deform_impls)}: choose among {', '.join(DEFORM_IMPLS)}")
    paths = parse_paths(fast_paths)
    compile_ = parse_paths(compile_, COMPILE_PARTS, "compile part")
    graph_modes = parse_graph_modes(cuda_graph)
    impls_wanted = tuple(dict.fromkeys(deform_impls))
    variants = []
    for layout in dict.fromkeys(torchvision_layouts):
        if layout != "none":
            variants.append(Variant(name=f"torchvision fcos ({layout})", model="torchvision", torchvision_layout=layout))
    variants += _ours_rows(arch, None, paths, impls_wanted, compile_, graph_modes)
    if also_arch is not None:
        variants += _ours_rows(resolve_arch(also_arch), also_arch, paths, impls_wanted, compile_, graph_modes)
    if ablate:
        variants += cumulative_ablation(impls_wanted[0] if "dcn" in str(arch) else "torchvision")
    return variants


def _ours_rows(arch: Arch, arch_name: str | None, paths: tuple[str, ...], deform_impls: tuple[str, ...],
               compile_: tuple[str, ...], graph_modes: tuple[bool, ...]) -> list[Variant]:
    """Ours once per DCN kernel (once without DCN ops) and graph mode; ``arch_name`` None: the bench's arch."""
    has_dcn = "dcn" in str(arch)
    impls = deform_impls if has_dcn else ("torchvision",)
    label = "all fast paths" if set(paths) == set(FAST_PATHS) else (",".join(paths) or "reference")
    compiled = f", compile={'+'.join(compile_)}" if compile_ else ""
    prefix = "ours" if arch_name is None else f"ours {arch_name}"
    rows = []
    for impl in impls:
        suffix = f", dcn={impl}" if has_dcn else ""
        for graphed in graph_modes:
            graph = ", train graph" if graphed else ""
            # with both modes the graphed row skips inference: the training graph changes training only
            rows.append(Variant(name=f"{prefix} ({label}{suffix}{compiled}{graph})", fast_paths=paths,
                                deform_impl=impl, compile=tuple(compile_), cuda_graph=graphed, arch=arch_name,
                                infer=not (graphed and False in graph_modes)))
    return rows


__all__ = ["BenchSettings", "Variant", "Batch", "BenchError", "make_batches", "build_ours", "build_torchvision_fcos",
           "measure_training", "measure_inference", "run_bench", "default_variants",
           "cumulative_ablation", "ratios", "arch_ratios", "parse_graph_modes", "train_graph_pad_to", "time_calls",
           "load_recipe"]
