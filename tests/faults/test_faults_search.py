"""Faults in a running search: the driver SIGKILLed at four moments, a second search on the same
run directory, a trial worker that crashes, a trial whose loss becomes NaN or infinite.

Every case ends with the run resumed (or left running) to completion and checked by
:func:`test_search_loop.check_completed_run`: exactly ``search.budget`` trained trials per stage,
no code trained twice, ``best.txt`` and ``state.json`` consistent; and ``history.jsonl``
parseable line by line, with every row written before the fault kept unchanged (no data lost).
Kills land at exact moments through pause points (:mod:`faults`), not timing guesses.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
from pathlib import Path

import pytest
import torch

from detector.cli import compose
from faults import (PausePoint, assert_one_line_bad_input, parse_history_lines, record_fault, rows_lost, run_cli,
                    sigkill, snapshot, start_cli, wait_for_marker)
from proxy_eval.result import FLOOR_REWARD
from search.run import run_search
from search_runs import check_completed_run, rows_of, toy_cfg

STAGES = ["fpn", "head"]
BUDGET = 3
# A tiny real proxy (cached features): the settings of test_search_loop's cached search.
TINY_CACHED = [
    "executor=local", "search.workers=1", "backbone.weights=none", "device=cpu",
    "data.num_train=12", "data.num_val=2", "data.image_min_side=64", "data.image_max_side=96",
    "data.large_every=0", "data.max_objects=3",
    "proxy_eval.train_images=8", "proxy_eval.val_images=4", "proxy_eval.resolution=128",
    "proxy_eval.width=64", "proxy_eval.adapt_iters=0", "proxy_eval.iters=2", "proxy_eval.batch_size=4",
    "proxy_eval.warmup_iters=0", "space.fpn_ops=[sep3,skip]", "space.head_ops=[conv1,sep3,skip]",
]


def toy_args(run_dir: Path, *extra: str) -> list[str]:
    return ["run", "proxy_eval=toy", "executor=local", "search.workers=1", f"search.budget={BUDGET}",
            f"search.run_dir={run_dir}", f"cache_dir={run_dir.parent / 'cache'}", *extra]


def searcher_pending(run_dir: Path) -> dict[int, list[int]]:
    """Proposal ids each stage's saved searcher holds as pending."""
    found = {}
    for index, stage in enumerate(STAGES):
        path = run_dir / f"searcher-{index}-{stage}.pt"
        if path.exists():
            found[index] = [p["id"] for p in torch.load(path, weights_only=True)["pending"]]
    return found


def check_resumed(run_dir: Path, before: list[dict], stages: list[str], budget: int) -> list[dict]:
    """A resumed run is complete, kept every row of ``before`` and left no searcher pending."""
    after = check_completed_run(run_dir, stages, budget)
    assert parse_history_lines(run_dir / "history.jsonl") == after
    assert rows_lost(before, after) == 0, "a row written before the fault was lost or rewritten"
    for index, stage in enumerate(stages):
        state = torch.load(run_dir / f"searcher-{index}-{stage}.pt", weights_only=True)
        assert state["pending"] == []
        assert state["num_told"] == sum(r["stage_index"] == index for r in after)
    return after


# ---------------------------------------------------------------------- SIGKILL of the driver
KILL_MOMENTS = {
    # inside the 3rd trial: its request is in flight (state.json lists it), nothing recorded yet
    "mid-trial": dict(target="proxy_eval.toy:ToyProxy.evaluate", call=3, when="before"),
    # the 4th history line is written, the searcher is not yet told nor saved (head stage)
    "after-history-append": dict(target="search.history:History.append", call=4, when="after"),
    # inside a searcher save: the temporary file is written, not yet renamed over the old state
    "mid-searcher-save": dict(target="torch:save", call=4, when="after"),
}


@pytest.mark.parametrize("moment", list(KILL_MOMENTS))
def test_sigkilled_driver_resumes_to_the_exact_budget_without_training_a_code_twice(tmp_path, moment,
                                                                                     record_property):
    run_dir = tmp_path / "run"
    pause = PausePoint(marker=tmp_path / "paused", **KILL_MOMENTS[moment])
    proc = start_cli("search", *toy_args(run_dir), pause=pause)
    try:
        wait_for_marker(pause, proc)
    finally:
        sigkill(proc)
    before = parse_history_lines(run_dir / "history.jsonl")
    assert before == rows_of(run_dir) and 2 <= len(before) < 2 * BUDGET, "the kill must land mid-run"
    pending = searcher_pending(run_dir)
    if moment == "after-history-append":  # the recorded trial is still pending in the saved searcher
        assert before[-1]["proposal_id"] in pending[before[-1]["stage_index"]]
    if moment == "mid-searcher-save":  # a temp file was left; the saved state is the previous one
        assert list(run_dir.glob(".searcher-*.tmp-*"))

    if moment == "mid-trial":  # resume through the real command once
        done = run_cli("search", "run", f"resume={run_dir}")
        assert done.returncode == 0, done.stderr[-3000:]
        assert "search finished" in done.stdout
    else:
        run_search(compose("search", [f"resume={run_dir}"]))

    after = check_resumed(run_dir, before, STAGES, BUDGET)
    record_fault(record_property, 1, rows_lost(before, after))
    for index, ids in pending.items():  # pending at the kill: told from history, or run again
        assert set(ids) <= {r["proposal_id"] for r in after if r["stage_index"] == index}


def test_sigkill_while_the_feature_cache_is_written_leaves_no_cache_and_resume_rebuilds_it(tmp_path,
                                                                                           record_property):
    run_dir, cache_dir = tmp_path / "run", tmp_path / "cache"
    args = ["run", *TINY_CACHED, "search.stages=[fpn]", "search.budget=2", f"search.run_dir={run_dir}",
            f"cache_dir={cache_dir}"]
    # after the features file is written into the temporary folder and hashed, before the
    # checksum file (the completion mark) and the rename into place
    pause = PausePoint("proxy_eval.feature_cache:file_sha256", tmp_path / "paused")
    proc = start_cli("search", *args, pause=pause)
    try:
        wait_for_marker(pause, proc)
    finally:
        sigkill(proc)
    features = cache_dir / "features"
    partial = [p for p in features.iterdir() if p.name.startswith(".tmp-")]
    assert len(partial) == 1 and (partial[0] / "features.pt").is_file()
    assert not (partial[0] / "features.pt.sha256").exists()
    assert [p for p in features.iterdir() if not p.name.startswith(".")] == []  # no cache under a key
    assert (run_dir / "config.yaml").is_file() and not (run_dir / "history.jsonl").exists()
    config = (run_dir / "config.yaml").read_bytes()

    run_search(compose("search", [f"resume={run_dir}"]))

    check_resumed(run_dir, [], ["fpn"], 2)
    record_fault(record_property, 1, int((run_dir / "config.yaml").read_bytes() != config))
    from proxy_eval.feature_cache import FeatureCache

    (complete,) = [p for p in features.iterdir() if not p.name.startswith(".")]
    FeatureCache(features, complete.name).verify()  # a whole cache, checksum included


# ---------------------------------------------------------------------- two searches, one run dir
def test_a_second_search_on_a_run_dir_in_use_is_refused_and_the_first_completes(tmp_path, record_property):
    run_dir = tmp_path / "run"
    release = tmp_path / "release"
    pause = PausePoint("search.history:History.append", tmp_path / "paused", call=1, release=release)
    first = start_cli("search", *toy_args(run_dir), pause=pause)
    try:
        wait_for_marker(pause, first)
        before = snapshot(run_dir)
        first_rows = rows_of(run_dir)
        for second in (("run", f"resume={run_dir}"),  # resume it while it runs
                       toy_args(run_dir)):  # start a fresh search in the same directory
            line = assert_one_line_bad_input(run_cli("search", *second), f"second search {second[:2]}")
            assert f"in use by another search (pid {first.pid})" in line
        assert snapshot(run_dir) == before  # the refused searches wrote nothing
        release.touch()
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            sigkill(first)
    assert first.returncode == 0, err[-3000:]
    assert "search finished" in out
    rows = check_completed_run(run_dir, STAGES, BUDGET)
    assert parse_history_lines(run_dir / "history.jsonl") == rows
    record_fault(record_property, 2, rows_lost(first_rows, rows))
    assert rows_lost(first_rows, rows) == 0


# ---------------------------------------------------------------------- trial workers
def test_a_trial_that_crashes_is_retried_and_one_that_keeps_crashing_is_recorded(tmp_path, monkeypatch,
                                                                                  record_property):
    """executor=local: an exception escaping the evaluator (what a dying worker looks like to the
    driver) is an ``error`` attempt; it is retried, and the search goes on either way."""
    from proxy_eval.toy import ToyProxy

    real_evaluate = ToyProxy.evaluate
    attempts: dict[str, int] = {}

    def crashing_evaluate(self, arch, seed=0, report=None):
        code = str(arch)
        attempts[code] = attempts.get(code, 0) + 1
        if len(attempts) == 2 and attempts[code] == 1:
            raise RuntimeError("worker crashed (injected)")  # 2nd candidate: first attempt only
        if len(attempts) == 3:
            raise RuntimeError("worker crashed again (injected)")  # 3rd candidate: every attempt
        return real_evaluate(self, arch, seed, report)

    monkeypatch.setattr(ToyProxy, "evaluate", crashing_evaluate)
    run_dir = tmp_path / "run"
    run_search(toy_cfg(run_dir, f"search.budget={BUDGET}", "search.retries=2"))
    rows = check_completed_run(run_dir, STAGES, BUDGET)
    trained = [r for r in rows if not r["reused"]]
    assert (trained[1]["status"], trained[1]["attempts"]) == ("ok", 2)
    assert (trained[2]["status"], trained[2]["attempts"], trained[2]["reward"]) == ("error", 3, FLOOR_REWARD)
    assert "worker crashed again" in trained[2]["error"]
    assert all(r["status"] == "ok" and r["attempts"] == 1 for i, r in enumerate(trained) if i not in (1, 2))
    record_fault(record_property, 1 + 3, len(STAGES) * BUDGET - len(trained))  # every trial has its row


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed")
def test_a_ray_worker_sigkilled_mid_trial_is_restarted_and_the_search_completes(tmp_path, record_property):
    """executor=ray: the worker process running the 2nd trial dies by SIGKILL inside the evaluation
    (:func:`faults.ray_worker_kill_hook`); Tune's FailureConfig (search.retries=1) restarts the trial
    and its result is recorded once. Fast twins: the local-executor crash test above, and
    test_search_ray's adapter test (a worker that keeps crashing is recorded as ``error``)."""
    import ray

    from faults import RAY_FAULT_DIR, RAY_KILL_EVALUATION, ROOT

    fault_dir = tmp_path / "evaluations"
    fault_dir.mkdir()
    env = {RAY_FAULT_DIR: str(fault_dir), RAY_KILL_EVALUATION: "2",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "helpers"), os.environ.get("PYTHONPATH", "")])}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=True,
             logging_level=logging.ERROR,
             runtime_env={"env_vars": env, "worker_process_setup_hook": "faults.ray_worker_kill_hook"})
    run_dir = tmp_path / "run"
    try:
        run_search(toy_cfg(run_dir, "executor=ray", "search.stages=[fpn]", "search.budget=3", "search.retries=1"))
    finally:
        ray.shutdown()
    evaluations = [(fault_dir / f"evaluation-{n}").read_text() for n in range(1, 5)]
    assert not (fault_dir / "evaluation-5").exists()
    assert evaluations[1] == evaluations[2], "the killed trial was not restarted with the same code"
    rows = check_completed_run(run_dir, ["fpn"], 3)
    assert [r["code"] for r in rows] == [evaluations[0], evaluations[1], evaluations[3]]
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]  # restarted, not failed
    assert parse_history_lines(run_dir / "history.jsonl") == rows
    # Tune recorded the crash of the killed attempt in the run's own Ray folder
    assert any(p.name.startswith("error") for p in (run_dir / "ray").rglob("*")), "no Tune error record"
    record_fault(record_property, 1, 3 - len(rows))


# ---------------------------------------------------------------------- NaN / inf in a trial
def test_a_trial_whose_loss_becomes_nan_or_inf_is_diverged_and_the_search_completes(tmp_path, monkeypatch,
                                                                                     record_property):
    """Real trials on cached features; the 1st trial's training loss is multiplied by NaN and the
    2nd's by +inf inside the real training loop; the 3rd trains normally."""
    from proxy_eval import cached as cached_module, decoder_training

    poison = {"factor": None}
    real_losses = decoder_training.decoder_losses
    real_evaluate = cached_module.CachedEvaluator.evaluate
    factors = iter([math.nan, math.inf])

    def poisoned_losses(*args, **kwargs):
        loss = real_losses(*args, **kwargs)
        return loss if poison["factor"] is None else loss * poison["factor"]

    def evaluate_with_poison(self, arch, seed=0, report=None):
        poison["factor"] = next(factors, None)
        try:
            return real_evaluate(self, arch, seed, report)
        finally:
            poison["factor"] = None

    monkeypatch.setattr(decoder_training, "decoder_losses", poisoned_losses)
    monkeypatch.setattr(cached_module.CachedEvaluator, "evaluate", evaluate_with_poison)
    run_dir = tmp_path / "run"
    run_search(compose("search", [*TINY_CACHED, "search.stages=[fpn]", "search.budget=3",
                                  f"search.run_dir={run_dir}", f"cache_dir={tmp_path / 'cache'}"]))
    rows = check_completed_run(run_dir, ["fpn"], 3)
    trained = [r for r in rows if not r["reused"]]
    assert [r["status"] for r in trained] == ["diverged", "diverged", "ok"]
    assert "nan" in trained[0]["error"] and "inf" in trained[1]["error"]
    assert all(r["reward"] == FLOOR_REWARD and r["loss"] is None for r in trained[:2])
    assert (run_dir / "best.txt").read_text().strip() == trained[2]["code"]
    assert parse_history_lines(run_dir / "history.jsonl") == rows  # NaN never reaches the JSON
    record_fault(record_property, 2, 3 - len(trained))


def test_toy_inject_nan_diverges_every_trial_and_the_stage_still_completes(tmp_path, record_property):
    """``proxy_eval.inject_nan`` through the CLI config: every trial diverged, none ok; the fpn stage
    spends its budget, and a head stage after it stops with a one-line reason (no ok FPN to fix)."""
    from detector.errors import UserError

    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match="no earlier trial finished 'ok'"):
        run_search(toy_cfg(run_dir, "search.budget=2", "proxy_eval.inject_nan=0"))
    rows = rows_of(run_dir)
    assert [r["status"] for r in rows if not r["reused"]] == ["diverged", "diverged"]
    assert all(r["stage"] == "fpn" and r["reward"] == FLOOR_REWARD for r in rows)
    run_dir = tmp_path / "fpn-only"
    run_search(toy_cfg(run_dir, "search.budget=2", "proxy_eval.inject_nan=0", "search.stages=[fpn]"))
    assert not (run_dir / "best.txt").exists()  # no ok trial: no best code claimed
    assert sum(not r["reused"] for r in rows_of(run_dir)) == 2
    record_fault(record_property, 4, 0)
