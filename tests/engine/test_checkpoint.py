"""Checkpoints: a stopped-and-resumed run equals an unbroken one; damaged files fall back; wrong codes refused."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.engine.checkpoint import (CheckpointError, capture_rng_state, load_checkpoint, load_latest, restore_rng_state,
                                 save_atomic, write_training_checkpoint)
from detector.cli import compose
from detector.engine.train import train

TINY_ITERATIONS = 6


def _tiny(cache: Path, run: Path, *overrides: str):
    return compose("train", ["experiment=synthetic_tiny", "device=cpu", f"cache_dir={cache}", f"out_dir={run}",
                             f"schedule.iterations={TINY_ITERATIONS}", "train.ckpt_every=0", *overrides])


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "nasfcos-cache"


@pytest.fixture(scope="module")
def unbroken(cache, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("unbroken") / "run"
    train(_tiny(cache, run))
    return run


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_stopped_and_resumed_run_equals_an_unbroken_one(cache, unbroken, tmp_path):
    run = tmp_path / "run"
    stopped = train(_tiny(cache, run, "train.stop_after=3"))
    assert stopped["stopped_at"] == 3 and (run / "last.pt").is_file() and not (run / "metrics.json").exists()
    torch.manual_seed(12345)  # a fresh process would start from other RNG states: the checkpoint must restore them
    np.random.seed(7)
    random.seed(7)
    resumed = train(_tiny(cache, run, "resume=true"))
    expected = json.loads((unbroken / "metrics.json").read_text())
    assert resumed["final_losses"] == expected["final_losses"]
    assert {k: resumed[k] for k in ("AP", "AP50", "AR100")} == {k: expected[k] for k in ("AP", "AP50", "AR100")}
    assert _losses(run) == _losses(unbroken)  # steps 1-3 before the stop, 4-6 after the resume
    final_resumed = load_checkpoint(run / "final.pt")["model"]
    final_unbroken = load_checkpoint(unbroken / "final.pt")["model"]
    assert final_resumed.keys() == final_unbroken.keys()
    assert all(torch.equal(final_resumed[k], final_unbroken[k]) for k in final_unbroken)


def test_resuming_a_finished_run_returns_its_metrics_without_training(cache, unbroken):
    before = (unbroken / "last.pt").stat().st_mtime_ns
    result = train(_tiny(cache, unbroken, "resume=true"))
    assert result == json.loads((unbroken / "metrics.json").read_text())
    assert (unbroken / "last.pt").stat().st_mtime_ns == before


def test_resume_with_another_arch_is_refused(cache, unbroken, tmp_path):
    run = tmp_path / "run"
    train(_tiny(cache, run, "train.stop_after=1"))
    with pytest.raises(CheckpointError, match="holds arch 'fpn:standard\\+head:fcos' but arch="):
        train(_tiny(cache, run, "resume=true", "arch=nasfcos-fpn"))


def _payload(iteration: int) -> dict:
    return {"arch": "fpn:standard+head:fcos", "config": {"seed": 0}, "iteration": iteration,
            "model": {"w": torch.full((3,), float(iteration))}}


def test_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    write_training_checkpoint(_payload(10), tmp_path)
    write_training_checkpoint(_payload(20), tmp_path)
    assert load_latest(tmp_path)[0]["iteration"] == 20
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[: len(data) // 2])  # a copy cut short
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(tmp_path / "last.pt")
    payload, path = load_latest(tmp_path)
    assert path.name == "previous.pt" and payload["iteration"] == 10
    assert "damaged" in caplog.text
    (tmp_path / "previous.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="every checkpoint .* is damaged"):
        load_latest(tmp_path)


def test_numbered_checkpoints_keep_only_the_newest(tmp_path):
    for iteration in (1, 2, 3, 4):
        write_training_checkpoint(_payload(iteration), tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == ["ckpt_0000003.pt", "ckpt_0000004.pt"]
    (tmp_path / "last.pt").write_bytes(b"")
    (tmp_path / "previous.pt").unlink()
    assert load_latest(tmp_path)[0]["iteration"] == 4


def test_a_failed_write_leaves_the_old_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    write_training_checkpoint(_payload(1), tmp_path)
    before = (tmp_path / "last.pt").read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_training_checkpoint(_payload(2), tmp_path)
    with pytest.raises(OSError, match="disk full"):
        save_atomic(_payload(2), tmp_path / "final.pt")
    assert (tmp_path / "last.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_foreign_file_is_refused_with_one_line(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not written by"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    save_atomic({**_payload(0), "rng": capture_rng_state()}, tmp_path / "c.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]
