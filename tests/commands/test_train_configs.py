"""Training experiments compose to the documented recipes, and bad training input is refused cleanly.

Bad input must give one line naming the problem and exit code 2 from the CLI, and must leave
existing runs untouched.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detector.model.backbone import EFFICIENTNET_LITE_NAMES, resolve_freezing
from detector.cli import CONF_DIR, compose
from detector.data.errors import DataError
from detector.engine.distributed import DeviceError
from detector.engine.train import train
from detector.errors import UserError
from detector.engine.optim import Schedule
from detector.model.recipe import Recipe
from detector.engine.run_dir import RunDirError
from detector.arch.zoo import resolve_arch

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_into_a_buildable_config(name):
    cfg = compose("train", [f"experiment={name}"])
    resolve_arch(str(cfg.arch))
    Schedule.from_cfg(cfg.schedule)
    Recipe.from_cfg(cfg.recipe)
    assert cfg.train.batch_size >= 1 and cfg.data.num_classes >= 1 and cfg.model.width % 32 == 0


def test_nasfcos_r50_1x_coco_is_the_authors_recipe():
    cfg = compose("train", ["experiment=nasfcos_r50_1x_coco"])
    assert cfg.arch == "nasfcos" and cfg.recipe.name == "nasfcos" and cfg.model.width == 256
    assert cfg.data.name == "coco" and list(cfg.data.train_sizes) == [800] and cfg.data.max_size == 1333
    assert cfg.data.flip_prob == 0.5
    assert cfg.backbone.name in ("resnet50", "resnet50_caffe") and cfg.backbone.weights == "imagenet"
    assert cfg.train.batch_size == 16
    s = Schedule.from_cfg(cfg.schedule)
    assert (s.iterations, s.lr, s.steps, s.warmup_iters) == (90000, 0.01, (60000, 80000), 500)
    assert s.warmup_factor == pytest.approx(1 / 3, abs=1e-3) and s.policy == "multistep"
    assert (s.bias_lr_factor, s.bias_weight_decay, s.momentum, s.weight_decay) == (2.0, 0.0, 0.9, 1e-4)


@pytest.mark.parametrize("name, arch", [("nasfcos_fpn_r50_1x_coco", "nasfcos-fpn"), ("fcos_r50_1x_coco", "fcos")])
def test_1x_baselines_differ_from_nasfcos_only_in_the_decoder(name, arch):
    reference = compose("train", ["experiment=nasfcos_r50_1x_coco"])
    cfg = compose("train", [f"experiment={name}"])
    assert cfg.arch == arch
    for key in ("schedule", "data", "backbone", "recipe", "train", "model"):
        assert cfg[key] == reference[key], key


def test_torchvision_experiment_follows_torchvisions_reference_recipe():
    cfg = compose("train", ["experiment=fcos_torchvision_r50_coco"])
    assert cfg.arch == "fcos" and cfg.recipe.name == "torchvision"
    s = Schedule.from_cfg(cfg.schedule)
    per_epoch = s.iterations // 26
    assert s.steps == (16 * per_epoch, 22 * per_epoch) and s.bias_lr_factor == 1.0
    assert s.warmup_iters == 1000 and s.warmup_factor == pytest.approx(0.001)


def test_mobilenet_experiment_uses_mobilenet_v2():
    cfg = compose("train", ["experiment=nasfcos_mobilenetv2_1x_coco"])
    assert cfg.backbone.name == "mobilenet_v2" and cfg.arch == "nasfcos"


def test_synthetic_experiments_need_no_download():
    """Synthetic experiments start from random weights or from weights a pip package installed."""
    for name in EXPERIMENTS:
        cfg = compose("train", [f"experiment={name}"])
        if cfg.data.name == "synthetic":
            packaged = cfg.backbone.weights == "imagenet" and cfg.backbone.name in EFFICIENTNET_LITE_NAMES
            assert cfg.backbone.weights == "none" or packaged, name


def test_default_is_pretrained_lite0_and_the_scratch_setup_is_one_override_away():
    default = compose("train", [])
    assert (default.backbone.name, default.backbone.weights) == ("efficientnet_lite0", "imagenet")
    assert resolve_freezing(default.backbone.weights, default.backbone.frozen_stages,
                            default.backbone.norm) == (1, "frozen_bn")
    for overrides in (["experiment=synthetic_fcos_scratch"], ["backbone=resnet18", "backbone.weights=none"]):
        cfg = compose("train", overrides)
        assert (cfg.backbone.name, cfg.backbone.weights) == ("resnet18", "none"), overrides
        assert resolve_freezing(cfg.backbone.weights, cfg.backbone.frozen_stages,
                                cfg.backbone.norm) == (-1, "bn"), overrides  # batch statistics from scratch


def test_the_gpu_form_is_the_default_experiment_with_more_images_and_iterations_on_the_same_val_split():
    from detector.data.synthetic import sample_layout, spec_from_config

    default, gpu = compose("train", ["experiment=synthetic_fcos"]), compose("train", ["experiment=synthetic_fcos_gpu"])
    assert (gpu.data.num_train, gpu.schedule.iterations, gpu.train.batch_size) == (8192, 5000, 16)
    for key in ("arch", "backbone", "recipe", "model"):
        assert gpu[key] == default[key], key
    assert gpu.schedule.lr == default.schedule.lr
    default_spec, gpu_spec = spec_from_config(default.data), spec_from_config(gpu.data)
    assert default_spec.num_val == gpu_spec.num_val
    # the val images (and the first training images) do not depend on how many training images there are
    assert all(sample_layout(gpu_spec, "val", i) == sample_layout(default_spec, "val", i) for i in range(8))
    assert sample_layout(gpu_spec, "train", 3) == sample_layout(default_spec, "train", 3)


# ----------------------------------------------------------------------------- bad input, in process


def _tiny(tmp_path: Path, *overrides: str):
    return compose("train", ["experiment=synthetic_tiny", "device=cpu", f"cache_dir={tmp_path / 'cache'}",
                             f"out_dir={tmp_path / 'run'}", *overrides])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_gpu_is_refused(tmp_path):
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        train(_tiny(tmp_path, "device=cuda"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("root", ["null", "''"])
def test_coco_without_data_root_is_refused(tmp_path, root):
    with pytest.raises(DataError, match="data.root"):
        train(_tiny(tmp_path, "data=coco", f"data.root={root}"))
    assert not (tmp_path / "run").exists()


def test_missing_data_root_is_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        train(_tiny(tmp_path, "data=coco", f"data.root={tmp_path / 'nowhere'}"))


def test_unwritable_out_dir_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(RunDirError, match="cannot be written|is a file"):
        train(_tiny(tmp_path, f"out_dir={blocker / 'run'}"))
    with pytest.raises(RunDirError, match="is a file"):
        train(_tiny(tmp_path, f"out_dir={blocker}"))


def test_resume_without_a_run_is_refused(tmp_path):
    with pytest.raises(RunDirError, match="holds no run"):
        train(_tiny(tmp_path, "resume=true"))


def test_resume_with_a_path_instead_of_true_is_refused(tmp_path):
    with pytest.raises(UserError, match="resume=true out_dir="):
        train(_tiny(tmp_path, f"resume={tmp_path}"))


def test_out_dir_holding_a_run_is_not_overwritten(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text('{"AP": 0.5}')
    (run / "last.pt").write_bytes(b"precious")
    with pytest.raises(RunDirError, match="finished run.*resume=true"):
        train(_tiny(tmp_path))
    assert (run / "last.pt").read_bytes() == b"precious" and (run / "metrics.json").read_text() == '{"AP": 0.5}'
    assert sorted(p.name for p in run.iterdir()) == ["last.pt", "metrics.json"]


def test_batch_not_divisible_by_processes_is_refused():
    from detector.engine.distributed import Context, per_process_batch

    ctx = Context(rank=0, world_size=4, local_rank=0, device=torch.device("cpu"))
    assert per_process_batch(16, ctx) == 4
    with pytest.raises(UserError, match="not divisible"):
        per_process_batch(6, ctx)


# ----------------------------------------------------------------------------- bad input, through the CLI


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "detector", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def _assert_one_line_exit_2(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and pattern in errors[0], result.stderr


def test_cli_unknown_override_exits_2(tmp_path):
    _assert_one_line_exit_2(_cli("train", "no_such_key=1", cwd=tmp_path), "no_such_key")


def test_cli_finished_run_exits_2_and_keeps_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    result = _cli("train", "experiment=synthetic_tiny", f"out_dir={run}", f"cache_dir={tmp_path}", cwd=tmp_path)
    _assert_one_line_exit_2(result, "already holds a finished run")
    assert [p.name for p in run.iterdir()] == ["metrics.json"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cli_device_cuda_without_gpu_exits_2(tmp_path):
    result = _cli("train", "experiment=synthetic_tiny", "device=cuda", f"out_dir={tmp_path / 'run'}", cwd=tmp_path)
    _assert_one_line_exit_2(result, "device=cuda")
    assert not (tmp_path / "run").exists()


def test_an_unknown_training_fast_path_is_refused_before_any_file(tmp_path):
    with pytest.raises(UserError, match="unknown fast path"):
        train(_tiny(tmp_path, "train.fast_paths=[losses,warp]"))
    assert not (tmp_path / "run").exists()


def test_training_fast_paths_auto_is_the_training_set_on_cuda_and_none_on_cpu():
    from detector.fast.switch import TRAINING_FAST_PATHS, training_fast_paths

    assert training_fast_paths("auto", torch.device("cpu")) == ()
    assert training_fast_paths("auto", torch.device("cuda")) == TRAINING_FAST_PATHS
    assert "cuda_graphs" not in TRAINING_FAST_PATHS
    assert training_fast_paths(["losses", "points"], torch.device("cpu")) == ("losses", "points")


def test_a_schedule_comes_whole_from_its_yaml_and_unknown_or_missing_keys_are_refused():
    from detector.engine.optim import ScheduleError

    for name in ("1x", "synthetic"):
        cfg = compose("train", [f"schedule={name}"])
        assert Schedule.from_cfg(cfg.schedule).warmup_iters == cfg.schedule.warmup_iters
    with pytest.raises(ScheduleError, match="'warmup' is not a schedule setting; a schedule sets iterations, lr"):
        Schedule.from_cfg(compose("train", ["+schedule.warmup=5"]).schedule)
    with pytest.raises(ScheduleError, match="'warmup_iters' is missing"):
        Schedule.from_cfg(compose("train", ["~schedule.warmup_iters"]).schedule)
