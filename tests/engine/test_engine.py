"""The training engine: optimizer groups, lr schedule, logging, and a real tiny run that learns."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from detector.model.build import build_detector_from_cfg
from detector.cli import compose
from detector.data.coco import build_dataset
from detector.engine.distributed import autocast_dtype
from detector.engine.train import seed_everything, train
from detector.errors import UserError
from detector.engine.evaluate import eval_loader, evaluate
from detector.engine.loggers import build_logger
from detector.engine.optim import Schedule, ScheduleError, build_optimizer, build_scheduler, lr_factor
from detector.arch.zoo import resolve_arch


def test_biases_get_twice_the_lr_and_no_weight_decay_and_frozen_params_are_left_out():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1))
    model[2].requires_grad_(False)
    optimizer = build_optimizer(model, Schedule(iterations=10, lr=0.1, weight_decay=1e-4, momentum=0.9))
    weights, biases = optimizer.param_groups
    assert (weights["lr"], weights["weight_decay"], biases["lr"], biases["weight_decay"]) == (0.1, 1e-4, 0.2, 0.0)
    assert {id(p) for p in biases["params"]} == {id(model[0].bias), id(model[1].bias)}
    assert {id(p) for p in weights["params"]} == {id(model[0].weight), id(model[1].weight)}
    assert optimizer.defaults["momentum"] == 0.9


def test_warmup_then_multistep():
    s = Schedule(iterations=100, lr=0.01, warmup_iters=10, warmup_factor=1 / 3, policy="multistep", steps=(60, 80))
    assert lr_factor(s, 0) == pytest.approx(1 / 3)
    assert lr_factor(s, 5) == pytest.approx(1 / 3 + 0.5 * (2 / 3))
    assert [lr_factor(s, i) for i in (10, 59, 60, 79, 80, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_cosine_decays_to_zero_and_the_scheduler_applies_it_to_every_group():
    s = Schedule(iterations=100, lr=0.1, warmup_iters=0, policy="cosine")
    assert [lr_factor(s, i) for i in (0, 50, 100)] == pytest.approx([1.0, 0.5, 0.0])
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(model, s)
    scheduler = build_scheduler(optimizer, s)
    for _ in range(50):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.05, 0.1])


@pytest.mark.parametrize("bad", [{"policy": "linear"}, {"steps": (80, 60)}, {"iterations": 0}])
def test_bad_schedules_are_refused(bad):
    with pytest.raises(ScheduleError):
        Schedule(**{"iterations": 100, "lr": 0.01, **bad})


def test_amp_defaults_to_off_on_cpu_and_bf16_on_gpu():
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("auto", torch.device("cuda", 0)) is torch.bfloat16
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(UserError, match="fp16 needs a CUDA"):
        autocast_dtype("fp16", torch.device("cpu"))


# The memorisation run: 16 shapes images, evaluated on those same images (about 40 s on 2 idle
# cores). A detector that trains at all reaches AP50 ~0.67 in 150 iterations; an untrained one ~0.
MEMORISE = ["experiment=synthetic_tiny", "device=cpu", "data.num_train=16", "data.val_split=train",
            "schedule.iterations=150", "schedule.warmup_iters=20", "train.batch_size=8", "train.log_every=10",
            "train.eval_every=75"]


@pytest.fixture(scope="module")
def memorised(tmp_path_factory) -> dict:
    cache = tmp_path_factory.getbasetemp() / "nasfcos-cache"
    run = tmp_path_factory.mktemp("engine") / "run"
    cfg = compose("train", [*MEMORISE, f"cache_dir={cache}", f"out_dir={run}"])
    seed_everything(int(cfg.seed))
    untrained = build_detector_from_cfg(cfg, resolve_arch(cfg.arch))  # the weights training starts from
    loader = eval_loader(build_dataset(cfg.data, "val", train=False, cache_dir=cache), 8, 0)
    baseline, _ = evaluate(untrained, loader)
    return {"cfg": cfg, "run": run, "baseline": baseline, "metrics": train(cfg)}


def test_a_tiny_run_learns_far_beyond_the_untrained_model(memorised):
    trained_ap50, untrained_ap50 = memorised["metrics"]["AP50"], memorised["baseline"]["AP50"]
    assert untrained_ap50 < 0.05
    assert trained_ap50 > untrained_ap50 + 0.3, (trained_ap50, untrained_ap50)


def test_the_run_directory_holds_config_log_metrics_and_weights(memorised):
    run: Path = memorised["run"]
    assert {"config.yaml", "log.jsonl", "metrics.json", "last.pt", "final.pt", "detections_val.json"} <= {
        p.name for p in run.iterdir()}
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(10, 151, 10))
    assert {"classification", "bbox_regression", "bbox_ctrness", "lr", "images_per_s"} <= set(steps[0])
    assert steps[-1]["loss"] < steps[0]["loss"]  # the learning itself: test_a_tiny_run_learns_far_beyond_the_untrained_model
    assert steps[1]["lr"] > steps[0]["lr"]  # warming up
    assert any("val/AP" in r for r in records) and "summary" in records[-1]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["AP50"] == memorised["metrics"]["AP50"] and metrics["arch_name"] == "fcos"


def test_evals_along_the_way_land_in_the_log_as_they_happen_and_in_the_metrics(memorised):
    run: Path = memorised["run"]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val/AP" in r][:1] == [75]  # kept even if the run is cut later
    assert [e["iteration"] for e in memorised["metrics"]["evals"]] == [75, 150]


def test_wandb_logger_runs_offline_and_records_the_arch_code(tmp_path):
    cfg = compose("train", ["logger=wandb"])
    assert cfg.logger.mode == "offline"
    logger = build_logger(cfg, tmp_path, arch_code="fpn:standard+head:fcos")
    logger.log({"loss": 1.5, "lr": 0.01}, step=1)
    logger.log_summary({"AP": 0.25})
    logger.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    # wandb's service process may still be flushing the run file when finish() returns
    deadline = time.monotonic() + 30
    while b"fpn:standard+head:fcos" not in runs[0].read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert b"fpn:standard+head:fcos" in runs[0].read_bytes()
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines[0]["loss"] == 1.5 and lines[1]["summary"] == {"AP": 0.25}


def test_training_with_the_cpu_safe_fast_paths_logs_the_reference_losses(tmp_path):
    """train.fast_paths swaps in equivalent code: the same run logs the same losses and AP.

    On the pretrained default backbone (frozen BN): a backbone from random weights with batch
    statistics at this lr turns the fast losses' float rounding (5e-8 relative at the first step)
    into 2% by the fourth step, which says nothing about the fast paths.
    """
    def run(name: str, paths: str) -> tuple[list[float], float]:
        out = tmp_path / name
        train(compose("train", ["experiment=synthetic_tiny", "backbone=efficientnet_lite0", "backbone.weights=imagenet",
                                "device=cpu", f"cache_dir={tmp_path / 'cache'}",
                                f"out_dir={out}", f"train.fast_paths={paths}", "train.max_eval_images=8"]))
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        metrics = json.loads((out / "metrics.json").read_text())
        return [r["loss"] for r in records if "loss" in r], metrics["AP50"]

    reference_losses, reference_ap50 = run("reference", "none")
    fast_losses, fast_ap50 = run("fast", "[losses,points,postprocess]")
    assert len(reference_losses) == 4
    assert fast_losses == pytest.approx(reference_losses, rel=1e-4)
    assert fast_ap50 == pytest.approx(reference_ap50, abs=1e-6)


def test_the_cuda_graph_training_step_is_refused_on_cpu_before_anything_is_written(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "detector", "train", "experiment=synthetic_tiny", "device=cpu",
                           "train.cuda_graph=true", f"out_dir={out}", f"cache_dir={tmp_path / 'cache'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "train.cuda_graph=true needs a CUDA device" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_the_cuda_graph_training_step_is_off_by_default_and_its_settings_are_checked():
    from types import SimpleNamespace

    from detector.cli import compose
    from detector.engine.train import training_graph_settings

    def settings(*overrides, distributed=False):
        ctx = SimpleNamespace(device=torch.device("cuda", 0), distributed=distributed)
        return training_graph_settings(compose("train", ["experiment=synthetic_tiny", *overrides]), ctx)

    assert settings() is None
    assert settings("train.cuda_graph=true", "train.cuda_graph_pad=[128,128]") == ((128, 128), 0)
    assert settings("train.cuda_graph=true", "train.cuda_graph_multiple=64") == (None, 64)
    with pytest.raises(UserError, match="pad_to"):
        settings("train.cuda_graph=true", "train.cuda_graph_pad=[128]")
    with pytest.raises(UserError, match="single-process"):
        settings("train.cuda_graph=true", distributed=True)
