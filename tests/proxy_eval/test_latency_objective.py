"""Latency measurement, the latency-aware objectives of the search, and the AP-latency front of the report.

Latencies are real measurements of small detectors (resnet18, width 32, 64x64 images, a few calls).
"""
import json
import math

import pytest

from detector.cli import compose
from detector.errors import UserError
from detector.deploy.latency import LatencySettings, measure_latency, random_detector, summarize
from proxy_eval.build import build_evaluator
from proxy_eval.latency_objective import LatencyAwareEvaluator, ObjectiveSettings
from search.pareto import pareto_front

TINY_LATENCY = ["search.latency.size=[64,64]", "search.latency.batch=2", "search.latency.iters=2", "search.latency.warmup=0",
                "search.latency.threads=1", "model.width=32"]  # batch 2: GroupNorm(32) of width 32 needs 2 values on a 1x1 P7


def test_ap_at_latency_reward_is_mnasnet_soft_or_hard():
    soft = ObjectiveSettings(objective="ap_at_latency", target_ms=100.0, w=-0.07)
    assert soft.reward(0.4, 100.0) == pytest.approx(0.4)
    assert soft.reward(0.4, 200.0) == pytest.approx(0.4 * 2 ** -0.07)
    assert soft.reward(0.4, 50.0) == pytest.approx(0.4 * 0.5 ** -0.07)  # soft: faster than the target earns a bonus
    hard = ObjectiveSettings(objective="ap_at_latency", target_ms=100.0, w=-1.0, w_under=0.0)
    assert hard.reward(0.4, 50.0) == pytest.approx(0.4)
    assert hard.reward(0.4, 200.0) == pytest.approx(0.2)
    for objective in ("ap", "pareto"):
        assert ObjectiveSettings(objective=objective).reward(0.4, 1e6) == 0.4


@pytest.mark.parametrize("override, match", [("search.objective=fast", "search.objective"),
                                             ("search.latency.w=0.5", "exponent"),
                                             ("search.latency.target_ms=0", "target_ms")])
def test_bad_objective_settings_are_refused(override, match):
    with pytest.raises(UserError, match=match):
        ObjectiveSettings.from_cfg(compose("search", [override]))


def test_the_driver_refuses_a_bad_objective_before_any_trial():
    from proxy_eval.build import prepare_proxy

    with pytest.raises(UserError, match="search.objective=speed"):
        prepare_proxy(compose("search", ["proxy_eval=toy", "search.objective=speed"]))
    with pytest.raises(UserError, match="needs reward=ap"):
        prepare_proxy(compose("search", ["proxy_eval=toy", "search.objective=ap_at_latency", "reward=neg_loss"]))


def test_objective_ap_leaves_the_evaluator_alone():
    assert not isinstance(build_evaluator(compose("search", ["proxy_eval=toy"])), LatencyAwareEvaluator)


def _joint_code(seed=0):
    import random

    from detector.arch.space import space_from_cfg

    return str(space_from_cfg(compose("search", []).space, "joint").sample(random.Random(seed)))


def test_toy_trial_measures_latency_once_per_code(tmp_path):
    """With ap_at_latency a toy trial carries the real detector's latency; the second trial of a code reads the cache."""
    cfg = compose("search", ["proxy_eval=toy", "search.objective=ap_at_latency", "search.latency.target_ms=50",
                             f"cache_dir={tmp_path}", *TINY_LATENCY])
    evaluator = build_evaluator(cfg)
    code = _joint_code()
    first = evaluator.evaluate(code)
    again = evaluator.evaluate(code)
    latency = first.extra["latency_ms"]
    assert first.ok and latency > 0 and first.extra["latency_p90_ms"] >= latency
    assert first.reward == pytest.approx(first.ap * (latency / 50) ** -0.07)
    assert not first.extra["latency_cached"] and again.extra["latency_cached"]
    assert again.extra["latency_ms"] == latency
    assert first.extra["deploy_params"] > 1e6  # the full detector (backbone included) was built


def test_latency_failure_is_a_failed_trial(tmp_path):
    cfg = compose("search", ["proxy_eval=toy", "search.objective=pareto", f"cache_dir={tmp_path}", *TINY_LATENCY,
                             "model.width=20"])  # GroupNorm(32) cannot take width 20
    result = build_evaluator(cfg).evaluate(_joint_code())
    assert result.status == "error" and "latency measurement" in result.error


def _row(trial, ap, latency):
    return {"trial": trial, "code": f"c{trial}", "status": "ok", "reused": False, "ap": ap, "reward": ap,
            "extra": {"latency_ms": latency}}


def test_pareto_front_keeps_exactly_the_non_dominated_trials():
    rows = [_row(0, 0.30, 100), _row(1, 0.25, 50), _row(2, 0.20, 80), _row(3, 0.30, 120), _row(4, 0.35, 300),
            {**_row(5, 0.9, 10), "status": "error"}, {**_row(6, 0.9, 10), "reused": True}]
    assert [r["trial"] for r in pareto_front(rows)] == [1, 0, 4]


def test_toy_search_reports_the_front(tmp_path):
    """A toy search with objective=pareto records latency in history and draws the front in the report."""
    from search.run import run_command

    run_dir = tmp_path / "run"
    cfg = compose("search", ["proxy_eval=toy", "executor=local", "search.workers=1", "search.budget=3",
                             "search.stages=[joint]", "controller=random", "search.objective=pareto",
                             f"search.run_dir={run_dir}", f"cache_dir={tmp_path}", *TINY_LATENCY])
    run_command(cfg)
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["extra"]["latency_ms"] > 0 for r in rows)
    assert all(r["reward"] == r["ap"] for r in rows)  # pareto: the reward stays the AP
    report = (run_dir / "report.md").read_text()
    assert "## AP-latency front" in report and (run_dir / "pareto_front.png").stat().st_size > 0
    for front_row in pareto_front(rows):
        assert f"| yes | {front_row['trial']} |" in report


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_measure_latency_reports_median_and_p90(runtime):
    cfg = compose("train", ["arch=fcos", "model.width=32"])
    model, arch = random_detector(cfg)
    settings = LatencySettings(size=(64, 64), batch=2, runtime=runtime, warmup=1, iters=3, threads=1)
    record = measure_latency(model, settings, "cpu", arch=arch)
    assert len(record["times_ms"]) == 3 and 0 < record["median_ms"] <= record["p90_ms"]
    assert record["device"].endswith(runtime) and record["batch"] == 2


def test_summarize_is_median_and_nearest_rank_p90():
    stats = summarize([float(v) for v in range(1, 11)])
    assert stats["median_ms"] == 5.5 and stats["p90_ms"] == 9.0
    assert not math.isnan(summarize([3.0])["p90_ms"])
