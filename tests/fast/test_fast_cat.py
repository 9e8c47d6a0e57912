"""detector.fast.cat: the fused ``cat`` aggregation equals detector.model.ops.ConcatReduce.

Values, the gradients of x, y and of every parameter, and the BatchNorm buffers afterwards, in
float64, training (batch statistics, momentum and cumulative-average updates) and eval (running
statistics), NCHW and channels_last, several channel blocks: the Triton kernels under Triton's
CPU interpreter (a subprocess, as the interpreter is switched on by an environment variable) and,
where CUDA exists, on the GPU through the FastConcatReduce module.
"""
from __future__ import annotations

import copy

import pytest
import torch

from detector.model.ops import ConcatReduce


def make_pair(width: int, momentum: float | None = 0.1, dtype=torch.float64, device="cpu", seed=0):
    """A reference ConcatReduce with non-trivial BN parameters/buffers and an identical copy."""
    torch.manual_seed(seed)
    reference = ConcatReduce(width).to(device, dtype)
    norm = reference.reduce[0]
    norm.momentum = momentum
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.3, 0.3)
        norm.running_mean.uniform_(-0.2, 0.2)
        norm.running_var.uniform_(0.5, 2.0)
    return reference, copy.deepcopy(reference)


def outputs_and_grads(module, forward, x, y, grad):
    """Output, grads of x, y and the parameters, then running_mean, running_var, num_batches_tracked."""
    x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
    out = forward(module, x, y)
    grads = torch.autograd.grad(out, [x, y, *module.parameters()], grad)
    norm = module.reduce[0]
    return [out, *grads, norm.running_mean.clone(), norm.running_var.clone(), norm.num_batches_tracked.clone()]


def compare_with_reference(forward, width=8, batch=2, height=5, width_px=7, training=True, channels_last=False,
                           momentum=0.1, device="cpu", steps=2, rtol=1e-10, atol=1e-10):
    reference, fast = make_pair(width, momentum, device=device)
    reference.train(training)
    fast.train(training)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):  # two steps: the second one sees updated running statistics
        x, y, grad = (torch.randn(batch, width, height, width_px, generator=gen, dtype=torch.float64).to(device)
                      for _ in range(3))
        if channels_last:
            x, y = x.to(memory_format=torch.channels_last), y.to(memory_format=torch.channels_last)
        expected = outputs_and_grads(reference, lambda m, a, b: m(a, b), x, y, grad)
        actual = outputs_and_grads(fast, forward, x, y, grad)
        names = ["output", "grad x", "grad y", "grad gamma", "grad beta", "grad mix", "running_mean",
                 "running_var", "num_batches_tracked"]
        for name, a, e in zip(names, actual, expected):
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
        out = actual[0]
        assert out.is_contiguous(memory_format=torch.channels_last) if channels_last else out.is_contiguous()


INTERPRETER_SCRIPT = """
import tests.fast.test_fast_cat as t
from detector.fast.cat import fused_concat_reduce
for case in (dict(), dict(channels_last=True), dict(training=False), dict(momentum=None),
             dict(width=160, height=3, width_px=50, channels_last=True)):  # 80 pairs: two pair blocks
    t.compare_with_reference(fused_concat_reduce, **case)
from detector.fast.triton import cat as fast_cat_triton
fast_cat_triton.SUM_PROGRAMS = 2  # one program per pair block: each loops over all 300 pixels
t.compare_with_reference(fused_concat_reduce, width=8, height=6, width_px=25, batch=2)
print("fused cat ok")
"""


def test_fused_cat_kernels_equal_concat_reduce_under_the_interpreter():
    pytest.importorskip("triton")
    from triton_interpreter import run_under_interpreter  # here: the subprocess imports this test module, without tests/ on its path
    result = run_under_interpreter(INTERPRETER_SCRIPT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fused cat ok" in result.stdout


def test_fused_cat_rejects_an_odd_width():
    from detector.fast.cat import fused_concat_reduce

    module = ConcatReduce(3)
    with pytest.raises(ValueError, match="even"):
        fused_concat_reduce(module, torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", [dict(), dict(channels_last=True, width=64), dict(training=False)])
def test_cuda_fast_concat_reduce_module_equals_the_reference(case):
    from detector.fast.fpn import FastConcatReduce

    def forward(module, x, y):
        module.__class__ = FastConcatReduce
        return module(x, y)

    compare_with_reference(forward, device="cuda", **case)
