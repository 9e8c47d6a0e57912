"""The pure parts of experiments/replay_early_stopping.py and experiments/bench_search_throughput.py."""
from __future__ import annotations

import pytest

from experiment_scripts import load_experiment
from search.early_stopping import StoppingSettings

replay_tool = load_experiment("replay_early_stopping")
bench = load_experiment("bench_search_throughput")


def _trials():
    # final rewards 0.9 > 0.8 > ... ; curves ranked the same way from the start, except "late" which
    # starts worst and ends best
    Trial = replay_tool.Trial
    out = [Trial(f"t{i}", tuple((it, 2.0 + i * 0.1 - it * 0.1) for it in range(1, 10)), 0.8 - i * 0.05)
           for i in range(8)]
    out.append(Trial("late", tuple((it, 5.0 - it * 0.5) for it in range(1, 10)), 0.9))
    return out


def test_a_replay_is_seeded_and_stops_only_below_the_rung_cutoff():
    settings = StoppingSettings("asha", max_t=9, grace_period=1, reduction_factor=3)
    trials = _trials()
    first = replay_tool.replay(trials, settings, workers=2, seed=3)
    assert first == replay_tool.replay(trials, settings, workers=2, seed=3)
    assert set(first) == {t.key for t in trials}
    assert all(1 <= it <= 9 for it in first.values()) and any(it < 9 for it in first.values())


def test_the_summary_counts_replays_that_drop_a_late_bloomer():
    settings = StoppingSettings("asha", max_t=9, grace_period=1, reduction_factor=3)
    out = replay_tool.summarize(_trials(), settings, workers=1, replays=20, top_k=3, eval_cost=0.0)
    # "late" (the best) is the worst trial at every rung before 9: it survives only where it comes first
    assert out["best_kept"] < 0.5 and out["top_k_kept"] <= out["best_kept"]
    assert 0 < out["cost_ratio"] < 1 and out["candidates_gain"] == pytest.approx(1 / out["cost_ratio"])


def test_the_time_split_of_a_trial_and_of_a_run():
    row = {"seconds": 10.0, "status": "ok", "reward": 0.5, "reused": False,
           "extra": {"curve": [[10, 2.0], [20, 1.0]], "report_seconds": [3.0, 5.0], "started_at": 100.0}}
    assert bench.split_trial(row) == pytest.approx({"setup": 1.0, "train": 4.0, "eval": 5.0})
    second = {**row, "extra": {**row["extra"], "started_at": 110.0}}
    out = bench.summarize_run([row, second], wall=24.0, slots=1)
    assert out["candidates"] == 2 and out["candidates_per_hour"] == pytest.approx(300.0)
    assert out["startup_s"] == pytest.approx(4.0)  # trials span 100..120
    assert out["train_share"] == pytest.approx(8 / 24) and out["idle_share"] == pytest.approx(0.0)


def test_bench_settings_name_the_mps_state_the_trials_per_device_and_the_scheduler():
    assert bench.parse_setting("off:4:none") == ("off", 4, "none")
    assert bench.parse_setting("on:16:asha") == ("on", 16, "asha")
    for bad in ("on:16", "maybe:4:none", "on:0:none", "on:four:none", "keep:4:hyperband"):
        with pytest.raises(ValueError, match="mps:trials:scheduler"):
            bench.parse_setting(bad)


def test_bench_refuses_to_switch_mps_for_in_process_trials_before_running_anything(capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["--executor", "local", "--settings", "off:4:none"])
    assert stop.value.code == 2 and "--executor ray" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        bench.main(["--settings", "off:4"])
    assert stop.value.code == 2 and "expected mps:trials:scheduler" in capsys.readouterr().err
