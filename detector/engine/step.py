"""One training step, shared by the training engine and both proxies.

- :func:`forward_losses` -- the detector's named training losses under the step's autocast;
- :func:`optimizer_step` -- zero the gradients, backpropagate ``loss`` (through the AMP gradient
  scaler when one is given), clip the gradient norm when ``clip_grad > 0``, step the optimizer.

Callers keep what differs between them: the engine's schedule, logging and checkpoints, the
proxies' fault injection, reports and deadlines, the cached proxy's decoder-only forward.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def forward_losses(net: nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]], device: torch.device,
                   amp_dtype: torch.dtype | None) -> dict[str, Tensor]:
    """``net(images, targets)`` under autocast to ``amp_dtype`` on ``device`` (None: full precision)."""
    device_type = device.type
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        return net(images, targets)


def optimizer_step(loss: Tensor, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], clip_grad: float,
                   scaler: torch.amp.GradScaler | None = None) -> None:
    """One SGD update from ``loss``; gradients are unscaled before clipping when ``scaler`` is on."""
    optimizer.zero_grad(set_to_none=True)
    (loss if scaler is None else scaler.scale(loss)).backward()
    if clip_grad > 0:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
