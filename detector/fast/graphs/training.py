"""CUDA-graph capture of the network part of a training step: backbone + FPN + head, forward AND backward.

A nasfcos training step launches ~3000 kernels; on an H100 the GPU waits ~30 ms of a ~165 ms step
for the host to launch them (experiments/PERF.md, session 4). :class:`GraphedTraining` records
``padded batch -> head outputs`` once with ``torch.cuda.make_graphed_callables`` -- one CUDA graph
for the forward pass and one for its backward pass, joined by one autograd node -- and afterwards
replays each with a single launch. Target assignment, the losses, ``loss.backward()`` up to the
head outputs, and the optimizer stay eager (their work depends on the boxes).

Contract (what :meth:`FCOS.forward <detector.model.fcos.FCOS.forward>` relies on):

- It applies only on CUDA, in train mode, with autograd on and outside inference mode
  (:meth:`GraphedTraining.applies`); everywhere else the eager code runs.
- ``run(model, padded)`` returns ``(features, head_out)`` like ``forward_features`` + ``head``: the
  same head outputs as eager execution (up to kernel-choice rounding), differentiable with respect
  to every parameter that requires grad. ``features`` are the graph's static [P3..P7] maps,
  detached (FCOS uses them only for their sizes, to place the points).
- One graph per key: the batch's shape, dtype and device, the autocast state, the DCN kernel
  (``detector.model.deform``) and its options. ``capacity`` (default 1) graphs are kept: each holds its
  own memory pool, about the activation memory of one eager step, so a new shape drops the oldest
  graph first. :func:`bucket_shape` (``pad_to`` / ``multiple``) pads batches to a fixed shape so the
  shape does not change; :meth:`FCOS.preprocess` applies it only where the graph applies. Extra
  zero padding is NOT value-neutral: no point in the added area gets a positive (targets are in
  image pixels), but those points add negatives to the focal loss, GroupNorm / BatchNorm statistics
  include the added area and feature maps near the old border see padding features instead of the
  convolutions' zeros -- the same effects FCOS's own batch padding already has for every image
  smaller than the largest. It is opt-in for that reason.
- Parameters are read by the graphs from their storage, so in-place updates (every optimizer) are
  seen; replacing a parameter's or buffer's storage (``model.to``, ``channels_last``), changing
  ``requires_grad``, or changing a frozen BatchNorm's buffers (their scale/shift is cached outside the
  graph) drops every graph. BatchNorm with batch statistics updates its running statistics inside
  the graph, in place, at every replay, as eagerly; the capture itself runs the network three more
  times eagerly (warm-up), so those statistics take three extra updates per capture.
- Parameter gradients come from the graph's static buffers, which autograd hands to ``.grad``
  without a copy: set gradients to None between steps (``optimizer.zero_grad(set_to_none=True)``, the
  default). Where a ``.grad`` is still set when a step starts (gradient accumulation,
  ``set_to_none=False``), :meth:`run` first replaces it by a copy, so the replay cannot overwrite it.
- Tensors made outside the graph and read by it (cached FrozenBatchNorm scales, resize matrices) are
  kept alive with the graph (:class:`ExternalTensors`): a cache dropping them would otherwise let
  the allocator reuse their memory under the graph's feet.
- A key whose capture fails runs eagerly from then on; ``failures`` says why (as
  ``GraphedInference.failures``). Module hooks run during the capture only. Not for DDP (its
  gradient hooks need the warm-up DDP documents); single-process training and the bench only.
"""
from __future__ import annotations

import dataclasses
import gc
import inspect
import math
from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torchvision.ops import FrozenBatchNorm2d

from detector.fast import deform as fast_deform
from detector.fast.deform_layer import deform_kernel
from detector.errors import UserError

HEAD_KEYS = ("cls_logits", "bbox_reg", "centerness")
# thread_local: CUDA calls of other threads (a loader's pin-memory thread) do not break the capture.
# Older torch (2.11) has no such argument: its global mode fails such a capture (recorded in failures).
_CAPTURE_OPTIONS = ({"capture_error_mode": "thread_local"}
                    if "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters else {})


class TrainGraphError(UserError):
    """A bad padding rule for the training graph."""


def bucket_shape(height: int, width: int, pad_to: Sequence[int] | None = None, multiple: int = 0) -> tuple[int, int]:
    """The padded (H, W) a batch of padded size (height, width) is brought to.

    ``pad_to`` (H, W): at least that size (a larger batch keeps its own size, i.e. gets its own
    graph); ``multiple``: then each side rounded up to a multiple of it (0 = no rounding). Both off:
    the batch's own size. E.g. ``pad_to=(800, 1344)`` holds every landscape COCO batch (short side
    800, long side <= 1333, padded to 32) in one shape.
    """
    if pad_to is not None:
        height, width = max(height, int(pad_to[0])), max(width, int(pad_to[1]))
    if multiple:
        height, width = (math.ceil(side / multiple) * multiple for side in (height, width))
    return int(height), int(width)


def check_padding(pad_to: Sequence[int] | None, multiple: int) -> tuple[tuple[int, int] | None, int]:
    """Validated ``(pad_to, multiple)``; TrainGraphError (one line) otherwise."""
    if pad_to is not None:
        try:
            pad_to = tuple(int(v) for v in pad_to)
        except (TypeError, ValueError):
            raise TrainGraphError(f"pad_to={pad_to!r}: give (height, width) as two positive integers") from None
        if len(pad_to) != 2 or min(pad_to) < 1:
            raise TrainGraphError(f"pad_to={list(pad_to)}: give (height, width) as two positive integers")
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 0:
        raise TrainGraphError(f"multiple={multiple!r}: give a non-negative integer (0 = no rounding)")
    return pad_to, multiple


def pad_bottom_right(padded: Tensor, shape: tuple[int, int]) -> Tensor:
    """Zero-pad (N, C, H, W) at the bottom and right to (N, C, *shape); the tensor itself if already so."""
    extra_h, extra_w = shape[0] - padded.shape[-2], shape[1] - padded.shape[-1]
    if extra_h < 0 or extra_w < 0:
        raise ValueError(f"pad_bottom_right: {tuple(padded.shape[-2:])} is larger than {shape}")
    if extra_h == 0 and extra_w == 0:
        return padded
    return F.pad(padded, (0, extra_w, 0, extra_h))


class NetworkFunction(nn.Module):
    """``padded -> flat tuple of head outputs`` of an FCOS model, for ``make_graphed_callables``.

    Its parameters are the model's (backbone, FPN and head are submodules here too, so
    ``parameters()`` is the graph's input surface); it calls the model's own ``forward_features``
    and ``head``. Outputs: ``cls_logits`` P3..P7, then ``bbox_reg``, then ``centerness`` (see
    :meth:`unflatten`). The pyramid is not an output (nothing differentiates through it outside the
    head, and an unused output would cost a zero-filled gradient per step): the last call's
    detached maps are kept in ``features`` -- after a capture, the graph's static maps.
    """

    def __init__(self, model: nn.Module, autocast_enabled: bool = False,
                 autocast_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.backbone, self.fpn, self.head = model.backbone, model.fpn, model.head
        self.__dict__["model"] = model  # not a submodule: parameters come through the three parts
        self.autocast_enabled, self.autocast_dtype = autocast_enabled, autocast_dtype
        self.features: list[Tensor] = []
        self.levels = 0

    def forward(self, padded: Tensor) -> tuple[Tensor, ...]:
        device = padded.device.type
        # cache off: a weight cast cached outside a graph would be freed when the autocast region ends
        with torch.autocast(device, dtype=self.autocast_dtype, enabled=self.autocast_enabled, cache_enabled=False):
            features = self.model.forward_features(padded)
            head_out = self.model.head(features)
        self.features = [f.detach() for f in features]
        self.levels = len(features)
        return tuple(t for key in HEAD_KEYS for t in head_out[key])

    def unflatten(self, flat: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        """The flat outputs back as ``{"cls_logits": [...], "bbox_reg": [...], "centerness": [...]}``."""
        levels = self.levels
        return {key: list(flat[i * levels:(i + 1) * levels]) for i, key in enumerate(HEAD_KEYS)}


class ExternalTensors(TorchDispatchMode):
    """While active, records the tensors that ops run during a CUDA stream capture read but did not
    make there (made before the capture: caches, parameters, the static input), so a graph can keep
    them alive. Tensors made during the capture (its pool) are not held. ``capturing`` says when a
    capture is on (tests pass ``lambda: True``)."""

    def __init__(self, capturing: Callable[[], bool] = torch.cuda.is_current_stream_capturing) -> None:
        super().__init__()
        self.capturing = capturing
        self.made: set[int] = set()
        self.read: dict[int, Tensor] = {}

    @staticmethod
    def _storage(t: Tensor) -> int | None:
        try:
            return t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # tensors without storage
            return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.capturing():
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, Tensor):
                    ptr = self._storage(t)
                    if ptr and ptr not in self.made and ptr not in self.read:
                        self.read[ptr] = t
            for t in tree_leaves(out):
                if isinstance(t, Tensor):
                    ptr = self._storage(t)
                    if ptr and ptr not in self.read:
                        self.made.add(ptr)
        return out


@dataclasses.dataclass
class _Entry:
    function: NetworkFunction  # its forward replays the graphs (make_graphed_callables patched it)
    keep_alive: list[Tensor]


def _frozen_bn_buffers(model: nn.Module) -> list[Tensor]:
    return [b for m in model.modules() if isinstance(m, FrozenBatchNorm2d) for b in m.buffers()]


class GraphedTraining:
    """``run(model, padded)`` -> (features, head outputs) by graph replay; see the module doc.

    capacity: graphs kept (each with its own activation pool); pad_to / multiple: the padding rule
    of :func:`bucket_shape`; warmup: eager runs before capture (make_graphed_callables' warm-up).
    """

    def __init__(self, capacity: int = 1, pad_to: Sequence[int] | None = None, multiple: int = 0,
                 warmup: int = 3) -> None:
        if capacity < 1:
            raise TrainGraphError(f"capacity={capacity}: keep at least one graph")
        self.capacity, self.warmup = capacity, warmup
        self.pad_to, self.multiple = check_padding(pad_to, multiple)
        self.failures: dict[tuple, str] = {}
        self.captures = 0  # graphs captured so far (a shape change captures again)
        self._graphs: OrderedDict[tuple, _Entry] = OrderedDict()
        self._weights: tuple | None = None

    @staticmethod
    def applies(model: nn.Module, padded: Tensor) -> bool:
        """CUDA, train mode, autograd on, not inference mode."""
        return (padded.is_cuda and model.training and torch.is_grad_enabled()
                and not torch.is_inference_mode_enabled())

    def __len__(self) -> int:
        return len(self._graphs)

    def pad(self, padded: Tensor) -> Tensor:
        """The batch zero-padded (bottom / right) to its :func:`bucket_shape`."""
        shape = bucket_shape(padded.shape[-2], padded.shape[-1], self.pad_to, self.multiple)
        return pad_bottom_right(padded, shape)

    def key(self, model: nn.Module, padded: Tensor) -> tuple:
        device = padded.device.type
        autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return (tuple(padded.shape), padded.dtype, str(padded.device), autocast, deform_kernel(model),
                dataclasses.astuple(fast_deform.DEFAULT_OPTIONS))

    @staticmethod
    def weights_key(model: nn.Module) -> tuple:
        """What invalidates every graph: parameter / buffer storages, requires_grad flags, frozen BN
        buffer versions. Not parameter versions: optimizers update in place, which graphs see."""
        return (tuple((p.data_ptr(), p.requires_grad) for p in model.parameters()),
                tuple(b.data_ptr() for b in model.buffers()),
                tuple(b._version for b in _frozen_bn_buffers(model)))

    def clear(self) -> None:
        """Drop every graph (and its memory pool)."""
        self._graphs.clear()
        _free_pools()

    def run(self, model: nn.Module, padded: Tensor) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
        key = self.key(model, padded)
        weights = self.weights_key(model)
        if weights != self._weights:
            if self._graphs:
                self.clear()
            self._weights = weights
        if key in self.failures:
            return _eager(model, padded)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.capacity:  # free the old pool before the new capture
                while len(self._graphs) >= self.capacity:
                    self._graphs.popitem(last=False)
                _free_pools()
            try:
                entry = self._capture(model, padded, key)
            except Exception as err:  # an op that cannot be captured: eager from now on for this key
                self.failures[key] = f"{type(err).__name__}: {str(err).strip()[:300]}"
                return _eager(model, padded)
            self._graphs[key] = entry
            self.captures += 1
        else:
            self._graphs.move_to_end(key)
        _detach_live_grads(model)
        flat = entry.function(padded)
        return entry.function.features, entry.function.unflatten(flat)

    def _capture(self, model: nn.Module, padded: Tensor, key: tuple) -> _Entry:
        autocast_enabled, autocast_dtype = key[3]
        function = NetworkFunction(model, autocast_enabled, autocast_dtype)
        static_input = padded.detach().clone()
        recorder = ExternalTensors()
        # make_graphed_callables refuses autocast's weight cache; the function sets the real state inside
        with torch.autocast(padded.device.type, dtype=autocast_dtype, enabled=autocast_enabled, cache_enabled=False):
            with recorder:
                torch.cuda.make_graphed_callables(function, (static_input,), num_warmup_iters=self.warmup,
                                                  allow_unused_input=True, **_CAPTURE_OPTIONS)
        return _Entry(function, list(recorder.read.values()))


def _free_pools() -> None:
    """Let dropped graphs' memory pools go back to the device."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _eager(model: nn.Module, padded: Tensor) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
    features = model.forward_features(padded)
    return features, model.head(features)


def _detach_live_grads(model: nn.Module) -> None:
    """Replace every set ``.grad`` by a copy: the graph's backward writes the static gradient
    buffers that an earlier step may have handed to ``.grad`` (see the module doc)."""
    for p in model.parameters():
        if p.grad is not None:
            p.grad = p.grad.clone()


def install_training_graph(model: nn.Module, pad_to: Sequence[int] | None = None, multiple: int = 0,
                           capacity: int = 1) -> GraphedTraining:
    """Put a :class:`GraphedTraining` on ``model.train_graphs`` (replacing any) and return it."""
    graphs = GraphedTraining(capacity=capacity, pad_to=pad_to, multiple=multiple)
    model.train_graphs = graphs
    return graphs


def remove_training_graph(model: nn.Module) -> None:
    """Back to eager training: drop ``model.train_graphs`` and its graphs."""
    graphs = getattr(model, "train_graphs", None)
    model.train_graphs = None
    if graphs is not None:
        graphs.clear()
