"""``python -m detector bench`` and the loader benchmark: output shape, settings, helpers.

The bench runs in its quick mode on the CPU; tests assert keys and positive numbers, never speed.
"""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from PIL import Image

from detector.__main__ import COMMANDS
from detector.commands.bench import bench_command, format_table, settings_from_cfg
from detector.cli import compose, dispatch
from detector.bench.settings import BenchError, BenchSettings
from detector.bench.variants import default_variants
from detector.bench.batches import make_batches
from detector.bench.throughput import ratios
from detector.bench.timing import time_calls
from detector.arch.zoo import zoo_arch
from experiment_scripts import load_experiment


@pytest.fixture(scope="module")
def bench_json():
    cfg = compose("bench", ["arch=fcos", "device=cpu", "bench.quick=true", "format=json"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        returned = bench_command(cfg)
    printed = json.loads(out.getvalue().strip().splitlines()[-1])
    assert printed["rows"] == json.loads(json.dumps(returned["rows"]))
    return printed


def test_bench_json_reports_both_models_ratios_and_the_self_check(bench_json):
    assert bench_json["arch"] == "fpn:standard+head:fcos" and bench_json["environment"]["device"] == "cpu"
    assert [row["model"] for row in bench_json["rows"]] == ["torchvision", "ours"]
    for row in bench_json["rows"]:
        assert "error" not in row, row
        for key in ("train_images_per_s", "train_step_ms", "infer_b1_images_per_s", "infer_b2_images_per_s"):
            assert row[key] > 0, key
    assert set(bench_json["ratios"]) == {"train_images_per_s", "infer_b1_images_per_s", "infer_b2_images_per_s"}
    assert all(value > 0 for value in bench_json["ratios"].values())
    check = bench_json["self_check"]
    assert check["ok"] and check["fp32"]["max_loss_rel_diff"] <= 1e-4
    assert set(check["fp32"]["fast_losses"]) == {"classification", "bbox_regression", "bbox_ctrness"}


def test_text_table_lists_every_row_the_ratios_and_the_self_check(bench_json):
    text = format_table(bench_json)
    assert "torchvision fcos (frozen_bn)" in text and "ours (all fast paths)" in text
    assert "ours / torchvision: " in text and "train " in text and "self-check fast vs reference (ok)" in text


@pytest.mark.parametrize("override,message", [
    ("bench.fast_paths=warp", "unknown fast path"),
    ("bench.precision=fp16", "bench.precision"),
    ("bench.torchvision=[mine]", "bench.torchvision"),
    ("format=yaml", "format="),
])
def test_bad_bench_settings_exit_2_with_one_line(override, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        dispatch("detector", "train", COMMANDS, ["bench", "device=cpu", "bench.quick=true", override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_settings_from_plain_dict_quick_mode_and_auto_precision():
    settings, options = settings_from_cfg({"device": "cpu", "bench": {"quick": True, "fast_paths": "losses,points",
                                                                      "deform_impl": ["fast"]}})
    assert settings.batch == 2 and settings.backbone == "resnet18" and settings.precision == "fp32"
    assert not settings.channels_last and options["fast_paths"] == ("losses", "points")
    with pytest.raises(BenchError, match="infer_batches"):
        BenchSettings(device="cpu", batch=4, infer_batches=(8,))


def test_variants_one_ours_row_without_dcn_one_per_kernel_with_dcn():
    fcos = default_variants(zoo_arch("fcos"), deform_impls=("fast", "torchvision"))
    assert [v.model for v in fcos] == ["torchvision", "ours"] and fcos[1].deform_impl == "torchvision"
    nasfcos = default_variants(zoo_arch("nasfcos"), deform_impls=("fast", "torchvision"), ablate=True,
                               torchvision_layouts=("none",))
    assert [v.deform_impl for v in nasfcos[:2]] == ["fast", "torchvision"]
    ablation = nasfcos[2:]
    assert [len(v.fast_paths) for v in ablation] == [0, 2, 3, 4, 5, 7, 8] and all(v.deform_impl == "fast" for v in ablation)
    with pytest.raises(BenchError, match="deform_impl"):
        default_variants(zoo_arch("nasfcos"), deform_impls=("cuda_magic",))


def test_ratios_divide_the_first_ours_row_by_the_first_torchvision_row():
    rows = [{"model": "torchvision", "train_images_per_s": 50.0, "infer_b1_images_per_s": 20.0},
            {"model": "ours", "train_images_per_s": 80.0, "infer_b1_images_per_s": 40.0},
            {"model": "ours", "train_images_per_s": 10.0}]
    assert ratios(rows) == {"train_images_per_s": 1.6, "infer_b1_images_per_s": 2.0}
    assert ratios(rows[1:]) == {}
    assert ratios([rows[0], {"model": "ours", "error": "failed"}] + rows[1:]) == {}  # never another row's numbers


def test_random_batches_are_coco_shaped():
    settings = BenchSettings(device="cpu", batch=3, infer_batches=(1,), short_side=40, max_size=70, num_batches=2,
                             boxes_per_image=5, num_classes=7)
    batches = make_batches(settings, torch.device("cpu"))
    assert len(batches) == 2
    for batch in batches:
        for image, target in zip(batch.images, batch.targets):
            height, width = image.shape[-2:]
            assert image.shape[0] == 3 and height == 40 and 50 <= width <= 70
            boxes = target["boxes"]
            assert 2 <= len(boxes) <= 8 and (boxes[:, 2:] > boxes[:, :2]).all()
            assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= width).all() and (boxes[:, 1::2] <= height).all()
            assert ((target["labels"] >= 0) & (target["labels"] < 7)).all()


def test_time_calls_runs_the_warmup_untimed_then_times_each_call():
    calls = []
    times = time_calls(calls.append, torch.device("cpu"), warmup=2, iters=3)
    assert calls == [0, 1, 2, 3, 4] and len(times) == 3 and all(t >= 0 for t in times)


def test_loader_bench_writes_coco_sized_jpegs_and_measures_the_train_stream(tmp_path):
    bench_loader = load_experiment("bench_loader")
    kb = bench_loader.write_dataset(tmp_path, 20, processes=1)
    assert kb > 5
    with Image.open(next((tmp_path / bench_loader.SPLIT).glob("*.jpg"))) as image:
        assert image.format == "JPEG" and image.size in bench_loader.COCO_SIZES
    dataset, how = bench_loader.build_dataset(tmp_path)
    assert how == "detector.data.coco.CocoDetection" and len(dataset) == 20
    image, target = dataset[0]
    assert min(image.shape[-2:]) == 800 and len(target["boxes"]) > 0
    fallback = bench_loader.JsonDetection(tmp_path, bench_loader.data_config(tmp_path))
    assert fallback[0][0].shape[-2:] == image.shape[-2:] or min(fallback[0][0].shape[-2:]) == 800

    from detector.data.stream import build_train_stream

    stream = build_train_stream(dataset, 4, 0, 0, 1, 0, workers=0)
    assert bench_loader.measure(stream, warmup=1, batches=2) > 0


def test_bench_defaults_come_from_its_own_yaml_and_unknown_keys_are_refused_with_the_list():
    from detector.cli import compose
    from detector.commands.bench import bench_defaults

    defaults = bench_defaults()
    settings, options = settings_from_cfg({"device": "cpu", "bench": {}})
    assert settings.batch == defaults["batch"] and settings.iters == defaults["iters"]
    assert settings.width == defaults["width"] and settings.backbone == defaults["backbone"]
    assert options["deform_impls"] == tuple(defaults["deform_impl"])
    assert "bench" not in compose("train", [])  # the training config carries no bench keys
    assert dict(compose("bench", []).bench) == defaults
    with pytest.raises(BenchError, match=r"bench\.itres: not a bench setting; the settings are quick, batch"):
        settings_from_cfg({"device": "cpu", "bench": {"itres": 3}})
