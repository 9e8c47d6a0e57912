"""Lifetimes of what a CUDA graph of :class:`detector.fast.graphs.inference.GraphedInference` reads (issue #21).

A captured graph reads tensors made outside its capture -- the FrozenBatchNorm scale/shift cache,
the interpolation matrices of the ``resize`` fast path -- by address. Those caches replace their
tensors when the call mode changes (``no_grad`` after ``inference_mode``, another autocast dtype), so
without a reference held by the graph, replaying an earlier graph read freed memory: stale values, or
an illegal address once ``empty_cache`` (called by every capture) had unmapped it. The ``gpu`` tests
reproduce that sequence; the CPU test checks the recorder the graphs use.
"""
from __future__ import annotations

import weakref

import pytest
import torch

from detector.model.build import build_detector
from detector.fast.norm import DtypeKeepingFrozenBatchNorm2d
from detector.fast.switch import set_fast_paths
from detector.fast.graphs.training import ExternalTensors
from detector.bench.models import load_recipe
from detector.arch.zoo import resolve_arch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _detector(arch: str = "nasfcos"):
    torch.manual_seed(0)
    model = build_detector(resolve_arch(arch), 5, load_recipe("nasfcos"), "resnet18", width=32, frozen_stages=1)
    return set_fast_paths(model, "all")


def test_the_recorder_holds_tensors_made_before_the_capture_and_not_those_made_in_it():
    cache = torch.rand(4)  # stands for a cached scale made before the capture
    weight = torch.rand(4)
    recorder = ExternalTensors(capturing=lambda: True)
    with recorder:
        made = cache * weight  # read: cache, weight; made: `made`
        (made + cache).sum()
    held = {t.untyped_storage().data_ptr() for t in recorder.read.values()}
    assert cache.untyped_storage().data_ptr() in held and weight.untyped_storage().data_ptr() in held
    assert made.untyped_storage().data_ptr() not in held
    ref = weakref.ref(cache)
    del cache
    assert ref() is not None  # alive as long as the recorder (the graph's keep-alive list)


def _scale_refs(model) -> list[weakref.ref]:
    return [weakref.ref(t) for m in model.modules() if isinstance(m, DtypeKeepingFrozenBatchNorm2d)
            for t in m.__dict__["_scale_shift_cache"][1]]


@pytest.mark.gpu
@needs_cuda
def test_a_graph_keeps_the_frozen_bn_cache_it_reads_when_another_mode_replaces_it():
    model = _detector().cuda().to(memory_format=torch.channels_last).eval()
    images = [torch.rand(3, 96, 128, device="cuda")]
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(images)  # captures: reads the inference-mode bf16 scale/shift caches
        replayed = model(images)
    refs = _scale_refs(model)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(images)  # another key: the caches now hold new (non-inference) tensors
    assert all(r() is not None for r in refs), "the first graph's cache tensors were freed under it"
    # reuse and unmap what was freed, then replay the first graph: same detections as before
    junk = [torch.full((4096,), float("nan"), device="cuda") for _ in range(2048)]
    del junk
    torch.cuda.empty_cache()
    junk = [torch.full((4096,), float("nan"), device="cuda") for _ in range(2048)]
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        again = model(images)
    torch.cuda.synchronize()
    for a, b in zip(replayed, again):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(model.graphs) == 2 and not model.graphs.failures


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_workspace_probe_refuses_to_run_without_a_gpu(capsys):
    from experiment_scripts import load_experiment

    assert load_experiment("probe_graph_workspace").main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
