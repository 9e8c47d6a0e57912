"""The bench's self-check: a model's fast paths against its reference code on one batch.

:func:`check_fast_paths` switches the model's active fast paths off and on
(:func:`detector.fast.switch.set_fast_paths`; same weights) and compares

- the three losses and the whole gradient vector, in true float32 (TF32 off) and, if asked, under bf16 autocast
  (relative tolerances: float32 1e-4 on losses, 1e-3 on the gradient; bf16 1e-2 and 5e-2, as
  rounding happens in different places). A bf16 gradient further than 5e-2 from the reference's
  still passes when the float32 run is there and the fast path's bf16 gradient is no further from
  the float32 reference gradient than the reference's own bf16 gradient is (x 1.5): bf16 rounding
  alone moves some models' gradients (DCN offsets) by more than 5e-2, and the question is whether
  the fast path is less accurate than the reference, not whether bf16 is;
- the batched post-processing against the reference on the same float32 head outputs (counts and
  scores);
- with ``cuda_graphs`` on CUDA: detections by graph replay against eager ones (bitwise).

Returns a JSON-able report with ``ok``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import Tensor

from detector.fast.postprocess import postprocess_batched
from detector.fast.switch import active_fast_paths, set_fast_paths
from detector.model.fcos import FCOS
from detector.model.postprocess import postprocess

TOLERANCES = {"fp32": (1e-4, 1e-3), "bf16": (1e-2, 5e-2)}  # (losses, gradient vector), relative


@contextlib.contextmanager
def true_float32():
    """No TF32 in cuDNN convolutions or matmuls (cuDNN allows it by default): TF32's 10-bit
    mantissa would put 1e-3 of noise into the float32 comparison."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def losses_and_gradient(model: FCOS, images: list[Tensor], targets: list[dict[str, Tensor]],
                        bf16: bool) -> tuple[dict[str, float], Tensor]:
    """Train-mode losses and the flattened float32 gradient of their sum (gradients cleared after).

    Without ``bf16`` the run is true float32 (no TF32)."""
    model.train()
    model.zero_grad(set_to_none=True)
    device = images[0].device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16), \
            (contextlib.nullcontext() if bf16 else true_float32()):
        losses = model(images, targets)
        sum(losses.values()).backward()
    gradient = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return {k: float(v.detach()) for k, v in losses.items()}, gradient


def check_fast_paths(model: FCOS, images: list[Tensor], targets: list[dict[str, Tensor]],
                     precisions: tuple[str, ...] = ("fp32",)) -> dict[str, Any]:
    """Compare the model's active fast paths with the reference; leaves them active."""
    fast = active_fast_paths(model)
    report: dict[str, Any] = {"fast_paths": list(fast)}
    passed = True
    fp32_grad = None
    for precision in precisions:
        loss_tol, grad_tol = TOLERANCES[precision]
        set_fast_paths(model, ())
        ref_losses, ref_grad = losses_and_gradient(model, images, targets, precision == "bf16")
        set_fast_paths(model, fast)
        fast_losses, fast_grad = losses_and_gradient(model, images, targets, precision == "bf16")
        loss_diff = max(abs(fast_losses[k] - ref_losses[k]) / max(abs(ref_losses[k]), 1e-12) for k in ref_losses)
        grad_diff = relative_distance(fast_grad, ref_grad)
        entry = {"reference_losses": ref_losses, "fast_losses": fast_losses,
                 "max_loss_rel_diff": loss_diff, "grad_rel_diff": grad_diff}
        grad_ok = grad_diff <= grad_tol
        if precision == "fp32":
            fp32_grad = ref_grad
        elif fp32_grad is not None:  # bf16: as accurate as the reference, measured against float32
            entry["reference_bf16_error"] = relative_distance(ref_grad, fp32_grad)
            entry["fast_bf16_error"] = relative_distance(fast_grad, fp32_grad)
            grad_ok |= entry["fast_bf16_error"] <= 1.5 * entry["reference_bf16_error"]
        ok = loss_diff <= loss_tol and grad_ok and all(math.isfinite(v) for v in fast_losses.values())
        passed &= ok
        report[precision] = {**entry, "ok": ok}
    report["detections"] = check_detections(model, images[:2])
    passed &= report["detections"]["ok"]
    if "cuda_graphs" in fast and images[0].is_cuda:
        report["cuda_graphs"] = check_graphs(model, images, "bf16" in precisions)
        passed &= report["cuda_graphs"]["ok"]
    report["ok"] = passed
    return report


def relative_distance(a: Tensor, reference: Tensor) -> float:
    """||a - reference|| / ||reference||."""
    return float((a - reference).norm() / reference.norm().clamp(min=1e-30))


@torch.no_grad()
def check_detections(model: FCOS, images: list[Tensor]) -> dict[str, Any]:
    """Batched vs reference post-processing on the same float32 head outputs."""
    model.eval()
    padded, sizes = model.preprocess(images)
    features = model.forward_features(padded)
    head_out = {k: [t.float() for t in v] for k, v in model.head(features).items()}
    points = model.points(features)
    reference = postprocess(head_out, points, sizes, model.recipe)
    batched = postprocess_batched(head_out, points, sizes, model.recipe)
    counts = [(len(r["scores"]), len(b["scores"])) for r, b in zip(reference, batched)]
    score_diff = max((float((r["scores"] - b["scores"]).abs().max()) if len(r["scores"]) and len(r["scores"]) == len(b["scores"])
                      else 0.0) for r, b in zip(reference, batched))
    return {"counts": counts, "max_score_diff": score_diff, "ok": all(a == b for a, b in counts) and score_diff <= 1e-5}


@torch.no_grad()
def check_graphs(model: FCOS, images: list[Tensor], bf16: bool) -> dict[str, Any]:
    """Detections by CUDA-graph replay == eager detections (other fast paths unchanged), b1 and b2."""
    fast = active_fast_paths(model)
    model.eval()
    equal = True
    for batch in ([images[0]], images[:2]):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            set_fast_paths(model, [p for p in fast if p != "cuda_graphs"])
            eager = model(batch)
            set_fast_paths(model, fast)
            model(batch)  # captures
            replayed = model(batch)
        equal &= all(torch.equal(a[k], b[k]) for a, b in zip(eager, replayed) for k in a)
    failures = model.graphs.failures if model.graphs is not None else {}
    return {"equal_to_eager": equal, "graphs": len(model.graphs or ()),
            "capture_failures": {str(k): v for k, v in failures.items()}, "ok": equal}
