"""experiments/count_step_ops.py: operators per phase of one end-to-end proxy training step."""
from __future__ import annotations

import torch

from detector.arch.zoo import resolve_arch
from detector.cli import compose
from detector.data.stream import batch_to_device, build_train_stream
from detector.engine.step import forward_losses
from experiment_scripts import load_experiment
from proxy_eval.build import build_evaluator

ops_tool = load_experiment("count_step_ops")


def test_every_phase_of_a_training_step_is_counted_and_the_network_forward_is_part_of_the_forward(
        tiny_synthetic_root):
    cfg = compose("search", [f"data.root={tiny_synthetic_root}", "proxy_eval=end_to_end", "device=cpu",
                             "model.width=32", "proxy_eval.train_images=12", "proxy_eval.val_images=6"])
    evaluator = build_evaluator(cfg)
    model = evaluator._build(resolve_arch("fcos", num_blocks=None, num_head_layers=None), 0, torch.device("cpu"))
    model.train()
    stream = iter(build_train_stream(evaluator._loaded()["train"], 2, 0, 0, 1, 0, 0, pin_memory=False))
    images, targets = batch_to_device(*next(stream), torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
    sum(forward_losses(model, images, targets, torch.device("cpu"), None).values()).backward()
    optimizer.step()  # the first step creates the momentum buffers one by one; the counted one is a later step
    optimizer.zero_grad(set_to_none=True)
    ops = ops_tool.count_phases(model, images, targets, optimizer)
    assert all(ops[key] > 0 for key in ("network_forward", "targets_and_losses", "backward", "optimizer"))
    assert ops["network_forward"] < ops["forward"]  # targets and losses come on top of the network
    assert ops["total"] == ops["forward"] + ops["backward"] + ops["optimizer"]
    assert ops["optimizer"] < 50  # foreach: a few multi-tensor ops, not a few per parameter
