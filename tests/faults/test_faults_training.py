"""Faults in detector training: SIGKILL mid-run, a damaged last checkpoint, a full disk while a
checkpoint is written, every checkpoint damaged.

The reference is an unbroken run of the same config in this process. A broken run resumed with
``resume=true`` must end at the same iteration with the same per-step losses, COCO metrics and
final weights (CPU training is bitwise reproducible for a given thread count, which
:func:`faults.cli_env` passes on to the subprocess). tests/engine/test_checkpoint.py holds the in-process
stop/resume twin (``train.stop_after``) and the unit tests of the checkpoint files.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from detector.engine import checkpoint as checkpoint_module
from detector.engine.checkpoint import load_checkpoint
from detector.cli import compose
from detector.engine.train import train
from detector.errors import WriteError
from faults import (PausePoint, assert_one_line_bad_input, disk_full_on_call, limit_file_size_in_child,
                    record_fault, run_cli, run_cli_in_process, sigkill, start_cli, wait_for_marker)

ITERATIONS = 6


def tiny_args(cache: Path, run: Path, *extra: str) -> list[str]:
    return ["experiment=synthetic_tiny", "device=cpu", f"cache_dir={cache}", f"out_dir={run}",
            f"schedule.iterations={ITERATIONS}", "train.ckpt_every=1", *extra]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults-train") / "cache"


@pytest.fixture(scope="module")
def unbroken(cache, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("unbroken") / "run"
    train(compose("train", tiny_args(cache, run)))
    return run


@pytest.fixture(scope="module")
def killed(cache, unbroken, tmp_path_factory) -> Path:
    """A training subprocess SIGKILLed after computing iteration 4, before its checkpoint."""
    base = tmp_path_factory.mktemp("killed")
    run = base / "run"
    pause = PausePoint("detector.engine.checkpoint:write_training_checkpoint", base / "paused", call=4, when="before")
    proc = start_cli("detector", "train", *tiny_args(cache, run), pause=pause)
    try:
        wait_for_marker(pause, proc)
    finally:
        sigkill(proc)
    assert load_checkpoint(run / "last.pt")["iteration"] == 3
    assert not (run / "metrics.json").exists()
    return run


def step_losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def assert_same_result(resumed: dict, run: Path, unbroken: Path) -> None:
    expected = json.loads((unbroken / "metrics.json").read_text())
    assert resumed["iterations"] == expected["iterations"] == ITERATIONS
    assert resumed["final_losses"] == expected["final_losses"]
    assert {k: resumed[k] for k in ("AP", "AP50", "AR100")} == {k: expected[k] for k in ("AP", "AP50", "AR100")}
    assert step_losses(run) == step_losses(unbroken)
    ours, theirs = load_checkpoint(run / "final.pt")["model"], load_checkpoint(unbroken / "final.pt")["model"]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def checkpoints_lost(run: Path, expected: dict[str, int]) -> int:
    """Checkpoints (name -> iteration) that should have survived the fault but are unreadable or
    hold another iteration."""
    lost = 0
    for name, iteration in expected.items():
        try:
            lost += load_checkpoint(run / name)["iteration"] != iteration
        except Exception:  # noqa: BLE001 - unreadable counts as lost
            lost += 1
    return lost


def copy_run(source: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(source, run)
    return run


def test_sigkilled_training_resumes_to_the_same_iteration_metrics_and_weights(cache, unbroken, killed, tmp_path,
                                                                             record_property):
    run = copy_run(killed, tmp_path)
    record_fault(record_property, 1, checkpoints_lost(run, {"last.pt": 3, "previous.pt": 2}))
    resumed = train(compose("train", tiny_args(cache, run, "resume=true")))
    assert_same_result(resumed, run, unbroken)


def test_a_truncated_last_checkpoint_is_reported_and_the_previous_one_used(cache, unbroken, killed, tmp_path,
                                                                            caplog, record_property):
    run = copy_run(killed, tmp_path)
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 3])  # a copy cut short
    record_fault(record_property, 1, checkpoints_lost(run, {"previous.pt": 2}))  # the damaged one is the fault
    with caplog.at_level(logging.WARNING, logger="detector.engine.checkpoint"):
        resumed = train(compose("train", tiny_args(cache, run, "resume=true")))
    assert "last.pt is damaged" in caplog.text and "resuming from previous.pt" in caplog.text
    assert_same_result(resumed, run, unbroken)  # iteration 2 -> 6 gives the same run


def test_a_full_disk_while_a_checkpoint_is_written_keeps_the_last_good_one_and_resume_completes(
        cache, unbroken, tmp_path, monkeypatch, record_property):
    run = tmp_path / "run"
    # the 3rd checkpoint write runs into a real file-size limit (the kernel cuts the write short)
    disk_full_on_call(monkeypatch, checkpoint_module, "_dump_to_temp", call=3, limit=lambda *a, **k: 64 * 1024)
    with pytest.raises(WriteError, match=r"cannot write .*last\.pt \(the write was cut short"):
        train(compose("train", tiny_args(cache, run)))
    monkeypatch.undo()
    lost = checkpoints_lost(run, {"last.pt": 2, "previous.pt": 1})  # the good checkpoints are intact
    record_fault(record_property, 1, lost)
    assert lost == 0
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "last.pt", "log.jsonl", "previous.pt"]
    resumed = train(compose("train", tiny_args(cache, run, "resume=true")))
    assert_same_result(resumed, run, unbroken)


def test_the_cli_reports_a_full_disk_in_one_line_and_leaves_no_partial_file(cache, unbroken, tmp_path,
                                                                             record_property):
    """A real subprocess under a 2 MB file-size limit: checkpoints (tens of MB) cannot be written."""
    run = tmp_path / "run"
    done = run_cli("detector", "train", *tiny_args(cache, run), preexec_fn=limit_file_size_in_child(2 << 20))
    line = assert_one_line_bad_input(done, "train on a full disk")
    assert "cannot write" in line and "last.pt" in line and "free disk space" in line
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "log.jsonl"]  # no temp file left
    from omegaconf import OmegaConf

    assert OmegaConf.load(run / "config.yaml").arch == "fcos"  # the files written before are whole
    record_fault(record_property, 1, 0)


def test_every_checkpoint_damaged_is_one_line_exit_2(cache, killed, tmp_path, record_property):
    run = copy_run(killed, tmp_path)
    for name in ("last.pt", "previous.pt"):
        (run / name).write_bytes(b"\x00" * 100)
    outcome = run_cli_in_process("detector", ["train", *tiny_args(cache, run, "resume=true")])
    line = assert_one_line_bad_input(outcome, "resume with damaged checkpoints")
    assert "every checkpoint" in line and "damaged" in line
    outcome = run_cli_in_process("detector", ["eval", f"ckpt={run / 'last.pt'}", f"cache_dir={cache}",
                                              "experiment=synthetic_tiny", "device=cpu"])
    assert "is damaged or not a torch checkpoint" in assert_one_line_bad_input(outcome, "eval a damaged file")
    record_fault(record_property, 2, None)
