"""``python -m detector eval`` and ``infer`` on a checkpoint of a tiny training run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detector.engine.checkpoint import CheckpointError
from detector.cli import compose
from detector.data.coco_eval import METRIC_NAMES
from detector.engine.train import train
from detector.commands.eval import checked_checkpoint
from detector.commands.infer import InferError, class_colour, draw_detections, infer_command

ROOT = Path(__file__).resolve().parents[2]
# score_thresh 0.001: a barely trained model still yields candidate boxes to evaluate and draw
TINY = ["experiment=synthetic_tiny", "device=cpu", "recipe.score_thresh=0.001", "schedule.iterations=2"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "detector", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    cache = tmp_path_factory.getbasetemp() / "nasfcos-cache"
    run = tmp_path_factory.mktemp("eval") / "run"
    metrics = train(compose("train", [*TINY, f"cache_dir={cache}", f"out_dir={run}"]))
    return {"cache": cache, "run": run, "metrics": metrics}


def test_eval_cli_prints_and_saves_the_metrics_training_reported(trained, tmp_path):
    out = tmp_path / "eval"
    result = _cli("eval", *TINY, f"cache_dir={trained['cache']}", f"ckpt={trained['run'] / 'last.pt'}",
                  f"out={out}", "arch=fcos", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "AP50" in result.stdout
    saved = json.loads((out / "eval_metrics.json").read_text())
    assert set(METRIC_NAMES) <= set(saved)
    assert all(saved[name] == pytest.approx(trained["metrics"][name], abs=1e-9) for name in METRIC_NAMES)
    detections = json.loads((out / "eval_detections.json").read_text())
    assert detections and {"image_id", "category_id", "bbox", "score"} <= set(detections[0])


def test_training_wrote_coco_detections_and_metrics(trained):
    run = trained["run"]
    detections = json.loads((run / "detections_val.json").read_text())
    assert detections and all(len(d["bbox"]) == 4 for d in detections)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["arch"] == "fpn:standard+head:fcos" and metrics["iterations"] == 2
    assert set(METRIC_NAMES) <= set(metrics)


def test_eval_cli_refuses_a_checkpoint_of_another_arch(trained, tmp_path):
    result = _cli("eval", *TINY, f"cache_dir={trained['cache']}", f"ckpt={trained['run'] / 'last.pt'}",
                  "arch=nasfcos", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "holds arch 'fpn:standard+head:fcos'" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_eval_refuses_damaged_and_missing_checkpoints(trained, tmp_path):
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes((trained["run"] / "last.pt").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="damaged"):
        checked_checkpoint(compose("train", [f"ckpt={damaged}"]), argv=[])
    with pytest.raises(CheckpointError, match="does not exist"):
        checked_checkpoint(compose("train", [f"ckpt={tmp_path / 'none.pt'}"]), argv=[])
    assert checked_checkpoint(compose("train", [f"ckpt={trained['run'] / 'final.pt'}"]), argv=["arch=fcos"])


def test_infer_cli_draws_boxes_and_writes_json(trained, tmp_path):
    source = next((trained["cache"] / "synthetic").glob("*/val"))
    images = sorted(source.glob("*.jpg"))[:2]
    folder = tmp_path / "images"
    folder.mkdir()
    for image in images:
        (folder / image.name).write_bytes(image.read_bytes())
    out = tmp_path / "out"
    result = _cli("infer", f"ckpt={trained['run'] / 'final.pt'}", f"images={folder}", f"out={out}",
                  "score_thresh=0", "device=cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads((out / "detections.json").read_text())
    assert [r["file"] for r in records] == [p.name for p in images]
    for record, image in zip(records, images):
        assert record["detections"], "score_thresh=0 keeps every candidate"
        first = record["detections"][0]
        assert first["class_name"] in ("circle", "rectangle", "triangle", "star", "ring", "cross")
        drawn = np.asarray(Image.open(out / f"{image.stem}.png").convert("RGB"))
        original = np.asarray(Image.open(image).convert("RGB"))
        assert drawn.shape == original.shape and (drawn != original).any()

    again = _cli("infer", f"ckpt={trained['run'] / 'final.pt'}", f"images={folder}", f"out={out}", cwd=tmp_path)
    assert again.returncode == 2 and "nothing was overwritten" in again.stderr and "Traceback" not in again.stderr


def test_infer_bad_images_are_one_line_errors(trained, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    base = [f"ckpt={trained['run'] / 'final.pt'}", "device=cpu"]
    with pytest.raises(InferError, match="cannot read image"):
        infer_command(compose("train", [*base, f"images={bad}", f"out={tmp_path / 'o1'}"]))
    with pytest.raises(InferError, match="does not exist"):
        infer_command(compose("train", [*base, f"images={tmp_path / 'nothing'}", f"out={tmp_path / 'o2'}"]))
    with pytest.raises(InferError, match="out is not set"):
        infer_command(compose("train", [*base, f"images={bad}"]))


def test_draw_detections_outlines_the_box_in_the_class_colour():
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    drawn = np.asarray(draw_detections(image, [{"box": [10, 20, 50, 60], "score": 0.9, "label": 2,
                                                "class_name": "triangle"}]))
    assert tuple(drawn[40, 10]) == class_colour(2)  # left edge
    assert tuple(drawn[59, 30]) == class_colour(2)  # bottom edge
    assert tuple(drawn[40, 30]) == (0, 0, 0)  # inside stays untouched


# ---------------------------------------------------------------------- #22: bad inputs to infer and eval
def _val_images(trained, count: int) -> list[Path]:
    return sorted(next((trained["cache"] / "synthetic").glob("*/val")).glob("*.jpg"))[:count]


def test_infer_skips_unreadable_images_subfolders_and_other_files_with_warnings(trained, tmp_path):
    """One unreadable image stopped infer mid-folder; subfolders and other files went unmentioned."""
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    good = _val_images(trained, 2)
    for image in good:
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "truncated.png").write_bytes(good[0].read_bytes()[:40])
    (folder / "notes.txt").write_text("hello")
    out = tmp_path / "out"
    result = _cli("infer", f"ckpt={trained['run'] / 'final.pt'}", f"images={folder}", f"out={out}", "device=cpu",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped 1 subfolders" in result.stderr and "notes.txt" in result.stderr
    assert "broken.jpg" in result.stderr and "truncated.png" in result.stderr
    records = json.loads((out / "detections.json").read_text())
    assert sorted(r["file"] for r in records) == sorted(p.name for p in good)
    assert sorted(p.name for p in out.iterdir()) == sorted(["detections.json", *(f"{p.stem}.png" for p in good)])


def test_a_failed_infer_leaves_nothing_that_blocks_the_retry(trained, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.jpg", "b.png"):
        (folder / name).write_bytes(b"garbage")
    out = tmp_path / "out"
    base = [f"ckpt={trained['run'] / 'final.pt'}", "device=cpu", f"images={folder}", f"out={out}"]
    with pytest.raises(InferError, match="none of the 2 images could be read"):
        infer_command(compose("train", base))
    assert not out.exists() or not any(out.iterdir()), "nothing half-written stays in out"
    (folder / "b.png").unlink()
    (folder / "c.jpg").write_bytes(_val_images(trained, 1)[0].read_bytes())
    (folder / "a.jpg").unlink()
    records = infer_command(compose("train", base))
    assert [r["file"] for r in records] == ["c.jpg"]


def test_infer_labels_are_the_datasets_category_ids(trained, tmp_path):
    import torch

    payload = torch.load(trained["run"] / "final.pt", map_location="cpu", weights_only=False)
    names_to_ids = dict(zip(payload["class_names"], payload["label_to_cat_id"]))
    folder = tmp_path / "images"
    folder.mkdir()
    for image in _val_images(trained, 2):
        (folder / image.name).write_bytes(image.read_bytes())
    records = infer_command(compose("train", [f"ckpt={trained['run'] / 'final.pt'}", "device=cpu",
                                              f"images={folder}", f"out={tmp_path / 'out'}", "score_thresh=0"]))
    detections = [d for r in records for d in r["detections"]]
    assert detections and all(d["label"] == names_to_ids[d["class_name"]] for d in detections)
    assert payload["label_to_cat_id"] == [1, 2, 3, 4, 5, 6]  # ids differ from the 0-based indices: the test can fail


def test_eval_refuses_to_overwrite_earlier_eval_files_like_infer(trained, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "eval_metrics.json").write_text('{"AP": 0.5}')
    result = _cli("eval", *TINY, f"cache_dir={trained['cache']}", f"ckpt={trained['run'] / 'last.pt'}",
                  f"out={out}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "nothing was overwritten" in result.stderr.strip().splitlines()[-1]
    assert (out / "eval_metrics.json").read_text() == '{"AP": 0.5}' and not (out / "eval_detections.json").exists()


@pytest.mark.parametrize("arch", ["nasfcos", "nasfcos-fpn", "fpn:standard+head:s0-conv1-conv1-conv1-conv1"])
def test_resuming_a_finished_run_as_another_arch_is_refused(trained, arch):
    """It returned the old run's metrics with exit 0, as if the asked-for architecture had trained."""
    from detector.engine.checkpoint import CheckpointError

    before = (trained["run"] / "metrics.json").read_bytes()
    argv = [*TINY, f"cache_dir={trained['cache']}", f"out_dir={trained['run']}", "resume=true"]
    with pytest.raises(CheckpointError, match="finished run .* holds arch 'fpn:standard\\+head:fcos'"):
        train(compose("train", [*argv, f"arch={arch}"]))
    assert (trained["run"] / "metrics.json").read_bytes() == before
    assert train(compose("train", argv))["AP"] == json.loads(before)["AP"]
