"""Switch an FCOS detector between its reference code and equivalent faster code paths.

Every fast path computes the reference's function (tests/fast/test_fast_paths.py checks each against
its reference; the bench re-checks losses on the GPU) and leaves parameters, buffers and state
dict keys unchanged, so checkpoints move freely between the two:

=============  ===============================================================================
name           what changes
=============  ===============================================================================
frozen_bn      FrozenBatchNorm2d keeps bf16 activations bf16 (``detector.fast.norm``)
group_norm     GroupNorm (+ the ReLU after it) as fused Triton kernels in the activation dtype
               and layout on CUDA (``detector.fast.norm``; the reference elsewhere)
losses         sync-free masked losses (``detector.fast.loss``)
points         pyramid points cached per feature-map sizes (:class:`PointsCache`)
postprocess    batched scoring / top-k / decoding, one sync per batch
               (``detector.fast.postprocess``)
cuda_graphs    inference on CUDA replays backbone + FPN + head as one CUDA graph per input
               shape (``detector.fast.graphs.inference``)
resize         searched-FPN bilinear resizes as two small GEMMs (``detector.fast.fpn``)
cat_reduce     the ``cat`` aggregation's grouped 1x1 conv as two multiply-adds
               (``detector.fast.fpn``)
=============  ===============================================================================

The deformable convolution's kernel is the same switch's ``deform`` argument (``torchvision`` =
the reference, ``fast``, ``auto``; :mod:`detector.fast.deform_layer`): it is a choice of kernel per
call rather than one more on/off path, and it belongs to the model like the eight above, so two
models in one process (trials in threads) may differ.

``compile_parts(model, parts)`` additionally wraps parts in ``torch.compile(dynamic=True)``
(opt-in: compilation takes tens of seconds per part and the first steps at new sizes recompile).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from detector.fast.postprocess import postprocess_batched
from detector.fast.loss import compute_losses_dense
from detector.errors import UserError
from detector.fast.deform_layer import set_deform_kernel
from detector.fast.fpn import CAT_REDUCE_CLASSES, RESIZE_CLASSES
from detector.fast.norm import DtypeKeepingFrozenBatchNorm2d, FusedGroupNorm
from detector.model.fcos import FCOS
from detector.fast.graphs.inference import GraphedInference
from detector.model.loss import compute_losses
from detector.model.points import Points, points_for
from detector.model.postprocess import postprocess

FAST_PATHS = ("frozen_bn", "group_norm", "losses", "points", "postprocess", "cuda_graphs", "resize", "cat_reduce")
COMPILE_PARTS = ("backbone", "fpn", "head")
FROZEN_BN_CLASSES = {FrozenBatchNorm2d: DtypeKeepingFrozenBatchNorm2d}  # reference class -> fast class


class FastPathError(UserError):
    """An unknown fast-path or compile-part name."""


class PointsCache:
    """The last ``capacity`` pyramids' points, keyed by feature-map sizes, offset and device.

    Points made under ``torch.inference_mode`` are inference tensors, which autograd refuses
    later; the mode is part of the key, so training never gets them.
    """

    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple, Points] = OrderedDict()

    def get(self, features: list[Tensor], offset: float) -> Points:
        key = (tuple(tuple(f.shape[-2:]) for f in features), offset, str(features[0].device),
               torch.is_inference_mode_enabled())
        points = self._entries.get(key)
        if points is None:
            points = points_for(features, offset)
            self._entries[key] = points
            if len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return points


class _FusedAway(nn.Identity):
    """Stands where a ReLU was fused into the GroupNorm before it; remembers that ReLU."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.__dict__["original"] = original  # not a submodule: the state dict stays the same


def parse_paths(paths: str | Iterable[str] | None, allowed: Sequence[str] = FAST_PATHS,
                what: str = "fast path") -> tuple[str, ...]:
    """``"all"`` / ``"none"`` / a comma-separated string / a list -> validated names in ``allowed``."""
    if paths is None:
        return ()
    if isinstance(paths, str):
        text = paths.strip()
        if text in ("all", ""):
            return tuple(allowed) if text == "all" else ()
        if text == "none":
            return ()
        paths = [p.strip() for p in text.split(",") if p.strip()]
    names = tuple(str(p) for p in paths)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise FastPathError(f"unknown {what} {unknown}; choose among {', '.join(allowed)} (or all / none)")
    return names


def _set_group_norm(model: nn.Module, fast: bool) -> None:
    for module in model.modules():
        if fast and type(module) is nn.GroupNorm:
            module.__class__ = FusedGroupNorm
        elif not fast and type(module) is FusedGroupNorm:
            module.__class__ = nn.GroupNorm
            module.__dict__.pop("fuse_relu", None)
    for parent in model.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for first, second in zip(names, names[1:]):
            norm, after = parent._modules[first], parent._modules[second]
            if fast and type(norm) is FusedGroupNorm and type(after) is nn.ReLU:
                norm.fuse_relu = True
                parent._modules[second] = _FusedAway(after)
            elif not fast and isinstance(after, _FusedAway):
                parent._modules[second] = after.original


def _swap_classes(model: nn.Module, reference_to_fast: dict[type, type], fast: bool) -> None:
    """Every module of a reference class becomes its fast class (or back): same state, same keys."""
    table = reference_to_fast if fast else {f: r for r, f in reference_to_fast.items()}
    for module in model.modules():
        if type(module) in table:
            module.__class__ = table[type(module)]


def _uses_any(model: nn.Module, classes) -> bool:
    return any(type(m) in classes for m in model.modules())


def set_fast_paths(model: FCOS, paths: str | Iterable[str] | None, deform: str | None = None) -> FCOS:
    """Turn exactly ``paths`` on (see the table above) and every other fast path off, and make the
    DCNs call the ``deform`` kernel (``torchvision`` | ``fast`` | ``auto``; None leaves it as it is);
    returns model."""
    wanted = set(parse_paths(paths))
    if deform is not None:
        set_deform_kernel(model, deform)
    _swap_classes(model, FROZEN_BN_CLASSES, "frozen_bn" in wanted)
    _set_group_norm(model, "group_norm" in wanted)
    _swap_classes(model, RESIZE_CLASSES, "resize" in wanted)
    _swap_classes(model, CAT_REDUCE_CLASSES, "cat_reduce" in wanted)
    model.loss_impl = compute_losses_dense if "losses" in wanted else compute_losses
    model.postprocess_impl = postprocess_batched if "postprocess" in wanted else postprocess
    model.points_cache = PointsCache() if "points" in wanted else None
    if "cuda_graphs" not in wanted:
        model.graphs = None
    elif model.graphs is None:
        model.graphs = GraphedInference()
    return model


# What training switches on with train.fast_paths=auto on CUDA: every path that is used in training
# (cuda_graphs only serves inference, and the periodic evaluation sees few shapes twice).
TRAINING_FAST_PATHS = ("frozen_bn", "group_norm", "losses", "points", "postprocess", "resize", "cat_reduce")


def training_fast_paths(value: str | Iterable[str] | None, device: torch.device) -> tuple[str, ...]:
    """``train.fast_paths`` -> names: ``auto`` is :data:`TRAINING_FAST_PATHS` on CUDA and none
    elsewhere (on the CPU the fast paths gain nothing and the reference code is the one to trust);
    anything else as :func:`parse_paths` reads it. Unknown names raise :class:`FastPathError`."""
    if isinstance(value, str) and value.strip() == "auto":
        return TRAINING_FAST_PATHS if device.type == "cuda" else ()
    return parse_paths(value)


def active_fast_paths(model: FCOS) -> tuple[str, ...]:
    """The fast paths currently on, in FAST_PATHS order."""
    on = {
        "frozen_bn": _uses_any(model, FROZEN_BN_CLASSES.values()),
        "group_norm": _uses_any(model, (FusedGroupNorm,)),
        "losses": model.loss_impl is compute_losses_dense,
        "points": model.points_cache is not None,
        "postprocess": model.postprocess_impl is postprocess_batched,
        "cuda_graphs": model.graphs is not None,
        "resize": _uses_any(model, RESIZE_CLASSES.values()),
        "cat_reduce": _uses_any(model, CAT_REDUCE_CLASSES.values()),
    }
    return tuple(name for name in FAST_PATHS if on[name])


def compile_parts(model: FCOS, parts: str | Iterable[str] | None) -> tuple[str, ...]:
    """``torch.compile(dynamic=True)`` the named parts in place (state dict keys unchanged)."""
    names = parse_paths(parts, COMPILE_PARTS, "compile part")
    for name in names:
        getattr(model, name).compile(dynamic=True)
    return names
