"""CUDA-graph replay of the network part of inference (backbone, FPN, head), one graph per shape.

At batch 1 a detector's forward pass is hundreds of small kernels; launching them one by one from
Python costs more than running them. :class:`GraphedInference` records ``padded batch ->
(pyramid, head outputs)`` once per input shape with ``torch.cuda.graph`` and afterwards replays
it with one launch. Post-processing stays eager (its sizes depend on the data).

It applies only where replay gives the same result as eager execution: CUDA, eval mode, no
autograd. A graph is keyed by the batch's shape and dtype, the autocast state, inference mode and
the deformable-convolution kernel; all graphs are dropped when any parameter or buffer is replaced
or modified in place (its storage or version changes), since values computed outside the graph --
the FrozenBatchNorm scale cache -- would otherwise go stale. Graphs share one memory pool; they are
replayed one after another on the current stream, which is what makes sharing safe. A shape whose
capture fails (an op that cannot be captured) runs eagerly from then on; ``failures`` says why.

Each graph keeps alive the tensors it reads that were made outside its capture (recorded during the
capture by :class:`detector.fast.graphs.training.ExternalTensors`): the FrozenBatchNorm scale/shift
cache and ``fast_fpn``'s interpolation matrices live in caches that replace or evict entries -- a
call in another mode (``no_grad`` after ``inference_mode``, another autocast dtype, a training step)
swaps the cache's tensors -- and a graph replayed after that would read freed memory: stale values,
or an illegal address once ``empty_cache`` (which every capture calls) has unmapped it.

Under autocast the graphs run with autocast's weight-cast cache off (a cached cast made outside
the graph would be freed when the autocast region ends): each replay casts the weights itself,
inside the graph.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from detector.fast.deform_layer import deform_kernel
from detector.fast.graphs.training import ExternalTensors

WARMUP_RUNS = 2  # eager runs on a side stream before capture (autotuning, lazy initialisation)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    static_input: Tensor
    static_output: tuple[list[Tensor], dict[str, list[Tensor]]]
    keep_alive: list[Tensor]  # tensors made outside the capture that the graph reads (caches, parameters)


def _weights_key(model: nn.Module) -> tuple:
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


class GraphedInference:
    """``run(model, padded)`` -> (pyramid, head outputs) by graph replay; see the module doc."""

    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self.failures: dict[tuple, str] = {}
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._pool = None
        self._weights: tuple | None = None

    @staticmethod
    def applies(model: nn.Module, padded: Tensor) -> bool:
        return padded.is_cuda and not model.training and not torch.is_grad_enabled()

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, model: nn.Module, padded: Tensor) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
        device = padded.device.type
        autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        key = (tuple(padded.shape), padded.dtype, autocast, torch.is_inference_mode_enabled(), deform_kernel(model))

        def network(x: Tensor) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
            with torch.autocast(device, dtype=autocast[1], enabled=autocast[0], cache_enabled=False):
                features = model.forward_features(x)
                return features, model.head(features)

        weights = _weights_key(model)
        if weights != self._weights:
            self._graphs.clear()
            self._weights = weights
        if key in self.failures:
            return network(padded)
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(network, padded)
            except Exception as err:  # an op that cannot be captured: eager from now on for this shape
                self.failures[key] = f"{type(err).__name__}: {str(err).strip()[:200]}"
                return network(padded)
            self._graphs[key] = entry
            if len(self._graphs) > self.capacity:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        entry.static_input.copy_(padded)
        entry.graph.replay()
        return entry.static_output

    def _capture(self, network: Callable, padded: Tensor) -> _Graph:
        static_input = padded.clone()
        side = torch.cuda.Stream(device=padded.device)
        side.wait_stream(torch.cuda.current_stream(padded.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                network(static_input)
        torch.cuda.current_stream(padded.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        recorder = ExternalTensors()
        # thread_local: CUDA calls of other threads (a loader's pin-memory thread) do not break the capture
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"), recorder:
            static_output = network(static_input)
        return _Graph(graph, static_input, static_output, list(recorder.read.values()))
