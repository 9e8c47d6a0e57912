"""Early stopping with executor=ray: Tune's scheduler stops trials of a toy search, and the Tune
searcher adapter records a trial stopped at an intermediate report as ``stopped``."""
from __future__ import annotations

import importlib.util
import json
import logging
import time

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed")

from search.early_stopping import stopped_reward  # noqa: E402
from search.run import run_search  # noqa: E402
from search_runs import check_completed_run, rows_of, toy_cfg, toy_stage_searcher  # noqa: E402


def test_a_trial_stopped_by_tunes_scheduler_is_recorded_as_stopped(tmp_path):
    adapter, run_dir = toy_stage_searcher(tmp_path)
    adapter.suggest("trial-a")
    adapter.suggest("trial-b")
    curve = [[10, 2.0], [20, 1.5]]
    last_report = {"iteration": 20, "loss": 1.5, "reward": 0.0, "curve": json.dumps(curve), "time_total_s": 3.0}
    adapter.on_trial_complete("trial-a", result=last_report)
    [row] = rows_of(run_dir.path)
    assert (row["status"], row["loss"], row["extra"]["stopped_at"], row["extra"]["curve"], row["attempts"]) == \
        ("stopped", 1.5, 20, curve, 1)
    assert row["reward"] == 0.0  # nothing completed yet in the stage: the floor


def test_ray_toy_search_with_asha_stops_trials_and_completes_the_budget(tmp_path):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=True,
             logging_level=logging.ERROR)
    try:
        run_dir = tmp_path / "run"
        run_search(toy_cfg(run_dir, "executor=ray", "search.workers=2", "search.budget=6", "search.stages=[joint]",
                           "search.scheduler=asha", "search.stopping.grace_period=2", "controller=random",
                           "proxy_eval.curve_steps=12", "proxy_eval.curve_noise=0.3", "proxy_eval.noise=0.05"))
    finally:
        ray.shutdown()
    rows = check_completed_run(run_dir, ["joint"], 6)
    stopped = [r for r in rows if r["status"] == "stopped"]
    assert stopped and len(stopped) < len(rows)
    for r in stopped:
        assert r["extra"]["stopped_at"] < 12 and r["extra"]["curve"][-1][0] == r["extra"]["stopped_at"]
        # timed like a completed trial (the throughput bench's start-up and set-up need it)
        times = r["extra"]["report_seconds"]
        assert r["extra"]["started_at"] > 0 and len(times) == len(r["extra"]["curve"]) and times == sorted(times)
        assert r["seconds"] == times[-1]
        earlier_ok = [o for o in rows[: r["trial"]] if o["status"] == "ok"]
        assert r["reward"] == stopped_reward([tuple(p) for p in r["extra"]["curve"]], earlier_ok)
    for r in rows:
        if r["status"] == "ok":
            assert [p[0] for p in r["extra"]["curve"]] == list(range(1, 13))  # the whole curve is recorded


ANY_CODE = ("fpn:c5-c4-sep3d3-sep3-cat/b0-c5-sep5d6-skip-cat/c4-b1-sep3-skip-sum/c5-b2-sep3-dcn-cat/"
            "c4-c4-skip-sep5d6-cat/b2-c5-sep5d6-skip-cat/c4-c3-dcn-sep3d3-cat+head:fcos")


class _FailsOnceEvaluator:
    """Reports a curve and fails with an error on its first attempt, then reports another to the end."""

    def __init__(self) -> None:
        self.attempts = 0

    def evaluate(self, arch, seed=0, report=None):
        from proxy_eval.result import TrialResult

        self.attempts += 1
        points = ((1, 3.0), (2, 2.0)) if self.attempts == 1 else ((1, 5.0), (2, 4.0), (3, 1.0))
        for iteration, loss in points:
            report({"iteration": iteration, "loss": loss})
        if self.attempts == 1:
            return TrialResult.failure("error", "first attempt fails")
        return TrialResult(status="ok", reward=0.5, ap=0.5, loss=1.0, seconds=0.1)


def test_the_trial_side_reports_its_curve_to_tune_but_not_the_last_point(monkeypatch):
    import search.ray_executor as ray_executor
    from search.local_executor import run_trial

    sent = []
    monkeypatch.setattr(ray_executor.tune, "report", sent.append)
    assert ray_executor._intermediate_reporter({"scheduler": "none", "max_t": 3}) is None
    report = ray_executor._intermediate_reporter({"scheduler": "asha", "max_t": 3})
    result, attempts = run_trial(_FailsOnceEvaluator(), ANY_CODE, seed=0, retries=1, report=report)
    assert result.status == "ok" and attempts == 2  # an in-process retry restarts its curve
    assert [(r["iteration"], r["loss"]) for r in sent] == [(1, 3.0), (2, 2.0), (1, 5.0), (2, 4.0)]  # not 3 = max_t
    assert json.loads(sent[-1]["curve"]) == [[1, 5.0], [2, 4.0]]
    retry_seconds = json.loads(sent[-1]["report_seconds"])
    assert len(retry_seconds) == 2 and retry_seconds == sorted(retry_seconds)  # the retry's own clock
    assert sent[-1]["started_at"] == pytest.approx(time.time() - retry_seconds[-1], abs=1.0)
    assert sent[-1]["started_at"] >= sent[0]["started_at"]  # the retry started after the first attempt


def test_a_trial_the_scheduler_stopped_keeps_its_start_and_report_times():
    import search.ray_executor as ray_executor

    last = {"iteration": 2, "loss": 4.0, "curve": "[[1, 5.0], [2, 4.0]]", "report_seconds": "[3.5, 6.0]",
            "started_at": 1000.0, "time_total_s": 9.0}
    result = ray_executor.stopped_by_scheduler(last)
    assert result.status == "stopped" and result.extra["stopped_at"] == 2
    assert result.extra["started_at"] == 1000.0 and result.extra["report_seconds"] == [3.5, 6.0]
    assert result.seconds == 6.0  # from its start to the report it was stopped at
    older = {k: v for k, v in last.items() if k not in ("report_seconds", "started_at")}
    assert ray_executor.stopped_by_scheduler(older).seconds == 9.0  # Tune's own count
