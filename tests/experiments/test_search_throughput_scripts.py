"""The pure parts of experiments/replay_early_stopping.py and experiments/bench_search_throughput.py."""
from __future__ import annotations

import functools
import math
import os
import subprocess
import time

import pytest

from experiment_scripts import load_experiment
from search.early_stopping import StoppingSettings

replay_tool = load_experiment("replay_early_stopping")
bench = load_experiment("bench_search_throughput")


def _trials():
    # final rewards 0.9 > 0.8 > ... ; curves ranked the same way from the start, except "late" which
    # starts worst and ends best
    Trial = replay_tool.Trial
    out = [Trial(f"t{i}", (tuple((it, 2.0 + i * 0.1 - it * 0.1) for it in range(1, 10)),), 0.8 - i * 0.05)
           for i in range(8)]
    out.append(Trial("late", (tuple((it, 5.0 - it * 0.5) for it in range(1, 10)),), 0.9))
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


def test_fidelity_trials_take_the_proxy_curves_of_every_seed_and_the_trained_ap_as_reward(tmp_path):
    import json

    proxy, truth = tmp_path / "proxy", tmp_path / "truth"
    proxy.mkdir()
    for label, ap_by_seed, curves in (("good", (0.4, 0.5), [[[1, 2.0], [9, 1.0]], [[1, 2.2], [9, 1.1]]]),
                                      ("bad", (0.1,), [[[1, 3.0], [9, 2.0]]]),
                                      ("untrained", (), [[[1, 3.0], [9, 2.0]]])):
        window = [[[it, loss + 0.5] for it, loss in curve] for curve in curves]
        (proxy / f"{label}.json").write_text(json.dumps(
            {"label": label, "code": "x", "proxy": {"9": {"ap": 0.0, "loss": 1.0, "curves": curves,
                                                          "window_curves": window}}}))
        for seed, ap in enumerate(ap_by_seed):
            (truth / f"{label}-s{seed}").mkdir(parents=True)
            (truth / f"{label}-s{seed}" / "metrics.json").write_text(json.dumps({"AP": ap, "AP50": ap}))
    trials = {t.key: t for t in replay_tool.trials_from_fidelity(str(proxy), str(truth), 9)}
    assert set(trials) == {"good", "bad"}  # no trained AP: left out
    assert trials["good"].reward == pytest.approx(0.45) and len(trials["good"].curves) == 2
    assert trials["good"].curves[1] == ((1.0, 2.2), (9.0, 1.1)) and trials["good"].last_iteration == 9
    windowed = {t.key: t for t in replay_tool.trials_from_fidelity(str(proxy), str(truth), 9, metric="window")}
    assert windowed["good"].curves[1] == ((1.0, 2.7), (9.0, 1.6)) and windowed["good"].reward == pytest.approx(0.45)


def test_a_replay_gives_each_trial_one_of_its_seed_curves():
    settings = StoppingSettings("asha", max_t=9, grace_period=3, reduction_factor=3)
    Trial = replay_tool.Trial
    # "twin" is the best at the rung with one seed's curve and the worst with the other's
    others = [Trial(f"t{i}", (tuple((it, 2.0 + 0.1 * i) for it in (3, 9)),), 0.5) for i in range(5)]
    twin = Trial("twin", (((3, 1.0), (9, 1.0)), ((3, 9.0), (9, 1.0))), 0.9)
    stopped = [replay_tool.replay([twin, *others], settings, workers=1, seed=seed)["twin"] < 9 for seed in range(40)]
    assert any(stopped) and not all(stopped)


def test_the_time_split_of_a_trial_and_of_a_run():
    row = {"seconds": 10.0, "status": "ok", "reward": 0.5, "reused": False, "code": "fpn:x",
           "extra": {"curve": [[10, 2.0], [20, 1.0]], "report_seconds": [3.0, 5.0], "started_at": 100.0}}
    assert bench.split_trial(row) == pytest.approx({"setup": 1.0, "train": 4.0, "eval": 5.0})
    second = {**row, "extra": {**row["extra"], "started_at": 110.0}}
    out = bench.summarize_run([row, second], wall=24.0, slots=1)
    assert out["candidates"] == 2 and out["candidates_per_hour"] == pytest.approx(300.0)
    assert out["startup_s"] == pytest.approx(4.0)  # trials span 100..120
    assert out["candidates_per_hour_after_startup"] == pytest.approx(3600.0 * 2 / 20)  # over the span only
    assert out["train_share"] == pytest.approx(8 / 24) and out["idle_share"] == pytest.approx(0.0)
    assert out["graphed"] == 0
    untimed = {**row, "seconds": 3.0, "extra": {}}  # listed first: its seconds must not pair with a start
    assert bench.summarize_run([untimed, row, second], wall=24.0, slots=1)["startup_s"] == pytest.approx(4.0)
    graphed = {**row, "extra": {**row["extra"], "cuda_graph_captures": 1, "cuda_graph_failures": 0}}
    failed = {**row, "extra": {**row["extra"], "cuda_graph_captures": 1, "cuda_graph_failures": 1}}
    assert bench.summarize_run([graphed, failed, row], wall=24.0, slots=1)["graphed"] == 1


def test_the_setup_is_split_into_data_model_build_and_the_first_iterations():
    row = {"seconds": 10.0, "status": "ok", "reward": 0.5, "reused": False, "code": "fpn:x",
           "extra": {"curve": [[10, 2.0], [20, 1.0]], "report_seconds": [4.0, 6.0], "started_at": 100.0,
                     "setup_seconds": {"data": 0.5, "build": 1.0}}}  # setup 4 - 10 x 0.2 = 2 s
    other = {**row, "extra": {**row["extra"], "setup_seconds": {"data": 0.1, "build": 0.6}}}
    split = bench.summarize_run([row, other], wall=24.0, slots=1)["setup_split_s"]
    assert split == pytest.approx({"data": 0.3, "build": 0.8, "first_iterations": (0.5 + 1.3) / 2})
    without = {**row, "extra": {k: v for k, v in row["extra"].items() if k != "setup_seconds"}}
    assert bench.summarize_run([without], wall=24.0, slots=1)["setup_split_s"] is None  # the cached proxy


def test_bench_settings_name_the_mps_state_the_trials_per_device_and_the_scheduler():
    assert bench.parse_setting("off:4:none") == ("off", 4, "none", ())
    assert bench.parse_setting("on:16:asha") == ("on", 16, "asha", ())
    assert bench.parse_setting("on:16:none:proxy_eval.cuda_graph=true;proxy_eval.cuda_graph_pad=[128,128]") == \
        ("on", 16, "none", ("proxy_eval.cuda_graph=true", "proxy_eval.cuda_graph_pad=[128,128]"))
    for bad in ("on:16", "maybe:4:none", "on:0:none", "on:four:none", "keep:4:hyperband", "on:16:none:cuda_graph"):
        with pytest.raises(ValueError, match="mps:trials:scheduler"):
            bench.parse_setting(bad)


def test_bench_refuses_to_switch_mps_for_in_process_trials_before_running_anything(capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["--executor", "local", "--settings", "off:4:none"])
    assert stop.value.code == 2 and "--executor ray" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        bench.main(["--settings", "off:4"])
    assert stop.value.code == 2 and "expected mps:trials:scheduler" in capsys.readouterr().err


def test_settings_are_compared_code_by_code_on_the_candidates_both_trained_to_the_end():
    def trial(code, reward, status="ok"):
        return {"code": code, "status": status, "reward": reward, "seconds": 1.0}

    first = [trial("a", 0.30), trial("b", 0.20), trial("c", 0.10), trial("d", 0.05), trial("e", 0.0, "stopped")]
    same_order = [trial("a", 0.31), trial("b", 0.18), trial("c", 0.12), trial("d", 0.01), trial("e", 0.5)]
    agree = bench.reward_agreement(first, same_order)
    assert agree["codes"] == 4  # "e" was stopped in the first setting: not compared
    assert agree["spearman"] == pytest.approx(1.0) and agree["max_abs_diff"] == pytest.approx(0.04)
    reversed_order = [trial("a", 0.0), trial("b", 0.1), trial("c", 0.2), trial("d", 0.3, "stopped")]
    assert bench.reward_agreement(first, reversed_order)["spearman"] == pytest.approx(-1.0)
    assert bench.reward_agreement(first, [trial("x", 0.3)]) == {"codes": 0, "spearman": None, "max_abs_diff": None}


def test_a_run_summary_lists_each_trained_candidate_for_that_comparison():
    row = {"seconds": 10.0, "status": "ok", "reward": 0.5, "reused": False, "code": "fpn:x",
           "extra": {"started_at": 100.0}}
    reused = {**row, "code": "fpn:y", "reused": True}
    out = bench.summarize_run([row, reused], wall=20.0, slots=1)
    assert out["trials"] == [{"code": "fpn:x", "status": "ok", "reward": 0.5, "seconds": 10.0}]


def test_smoothing_replaces_each_report_by_the_mean_of_its_last_reports():
    trial = replay_tool.Trial("t", (((1, 4.0), (2, 2.0), (3, 0.0)), ((1, 1.0), (2, 1.0), (3, 1.0))), 0.5)
    (out,) = replay_tool.smoothed([trial], 2)
    assert out.curves == (((1, 4.0), (2, 3.0), (3, 1.0)), ((1, 1.0), (2, 1.0), (3, 1.0)))
    assert out.key == "t" and out.reward == 0.5
    assert replay_tool.smoothed([trial], 1)[0].curves == trial.curves


def test_window_metric_on_a_study_without_window_curves_is_one_line_and_exit_2(tmp_path, capsys):
    import json

    proxy, truth = tmp_path / "proxy", tmp_path / "truth"
    proxy.mkdir()
    (proxy / "a.json").write_text(json.dumps({"label": "a", "code": "x", "proxy": {"9": {"curves": [[[1, 2.0], [9, 1.0]]]}}}))
    (truth / "a-s0").mkdir(parents=True)
    (truth / "a-s0" / "metrics.json").write_text(json.dumps({"AP": 0.3, "AP50": 0.3}))
    with pytest.raises(SystemExit) as stop:
        replay_tool.main(["--fidelity-dir", str(proxy), "--ground-truth", str(truth), "--iters", "9", "--metric", "window"])
    assert stop.value.code == 2 and "window_curves" in capsys.readouterr().err


def fake_mps_control(tmp_path, monkeypatch, quit_sleep_s: float, start_fails: bool = False,
                     gpu_processes: tuple[tuple[int, str], ...] = ()) -> None:
    """An ``nvidia-cuda-mps-control`` on PATH whose ``quit`` takes ``quit_sleep_s`` (a daemon
    waiting for clients that never leave) and whose ``-d`` fails if ``start_fails``; and an
    ``nvidia-smi`` that lists ``gpu_processes`` (pid, name) as the GPU's compute processes while they
    live (``nvidia-smi`` as the only name: listed always), so that no test sees the machine's own GPU."""
    tool = tmp_path / "bin" / "nvidia-cuda-mps-control"
    tool.parent.mkdir()
    start = "echo 'cannot start the daemon' >&2; exit 1" if start_fails else "exit 0"
    tool.write_text(f"#!/bin/sh\nif [ \"$1\" = -d ]; then {start}; fi\ncat > /dev/null\nsleep {quit_sleep_s}\n")
    tool.chmod(0o755)
    listing = "".join(f"echo '{pid}, {name}'\n" if name == "nvidia-smi" else
                      f"kill -0 {pid} 2>/dev/null && echo '{pid}, {name}'\n" for pid, name in gpu_processes)
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\n{listing}exit 0\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(bench.time, "sleep", lambda s: None if s >= 2.0 else real_sleep(s))


real_sleep = time.sleep


def test_stopping_mps_gives_up_instead_of_waiting_for_ever_on_attached_clients(tmp_path, monkeypatch):
    fake_mps_control(tmp_path, monkeypatch, quit_sleep_s=30)
    begin = time.monotonic()
    state = bench.set_mps("off", timeout_s=1.0, leftover="^no-such-process-title-xyz")
    assert state.startswith("off failed") and "did not quit" in state
    assert time.monotonic() - begin < 15
    assert bench.set_mps("on", timeout_s=5.0) == "on"


def test_stopping_mps_kills_trial_workers_left_over_from_the_previous_run(tmp_path, monkeypatch):
    fake_mps_control(tmp_path, monkeypatch, quit_sleep_s=0)
    title = f"bench-leftover-worker-{os.getpid()}"
    worker = subprocess.Popen(["bash", "-c", f"exec -a {title} sleep 60"])
    try:
        real_sleep(0.3)
        monkeypatch.setattr(bench, "stop_leftover_processes",
                            functools.partial(bench.stop_leftover_processes, wait_s=0.5))
        assert bench.set_mps("off", timeout_s=5.0, leftover=f"^{title}") == "off (1 leftover process(es) killed)"
        assert worker.wait(timeout=5) != 0  # killed, not left to finish its minute
    finally:
        worker.kill()


def test_stopping_mps_kills_the_processes_left_on_the_gpu_but_not_the_mps_server(tmp_path, monkeypatch):
    client = subprocess.Popen(["sleep", "60"])
    server = subprocess.Popen(["sleep", "60"])
    try:
        fake_mps_control(tmp_path, monkeypatch, quit_sleep_s=0,
                         gpu_processes=((server.pid, "/usr/bin/nvidia-cuda-mps-server"), (client.pid, "python3")))
        monkeypatch.setattr(bench, "stop_leftover_processes",
                            functools.partial(bench.stop_leftover_processes, wait_s=0.5))
        assert bench.gpu_clients() == {client.pid: "python3"}
        assert bench.set_mps("off", timeout_s=5.0, leftover="^no-such-process-title-xyz") == \
            "off (1 leftover process(es) killed)"
        assert client.wait(timeout=5) != 0  # killed
        assert server.poll() is None  # the MPS server is the daemon's to stop
    finally:
        client.kill()
        server.kill()


def test_a_daemon_that_does_not_quit_is_reported_with_the_clients_still_attached(tmp_path, monkeypatch):
    ghost = 4194999  # above any pid_max: listed by nvidia-smi, but no process to kill
    fake_mps_control(tmp_path, monkeypatch, quit_sleep_s=30, gpu_processes=((ghost, "nvidia-smi"),))
    monkeypatch.setattr(bench, "stop_leftover_processes",
                        functools.partial(bench.stop_leftover_processes, wait_s=0.5))
    state = bench.set_mps("off", timeout_s=1.0, leftover="^no-such-process-title-xyz")
    assert state.startswith("off failed") and f"clients still attached: {ghost} nvidia-smi" in state


def test_after_a_failed_mps_switch_no_later_setting_runs(tmp_path, monkeypatch, capsys):
    import json

    import search.run

    fake_mps_control(tmp_path, monkeypatch, quit_sleep_s=0, start_fails=True)

    def no_search(cfg):
        raise AssertionError("a setting ran with the machine's MPS state unknown")

    monkeypatch.setattr(search.run, "run_search", no_search)
    out = tmp_path / "bench.json"
    bench.main(["--executor", "ray", "--no-warmup", "--budget", "1", "--settings", "on:16:none", "off:4:none",
                "keep:4:none", "--json", str(out), "--", "proxy_eval=end_to_end", f"cache_dir={tmp_path / 'cache'}"])
    done = json.loads(out.read_text())
    assert done["results"] == []
    assert [s["setting"] for s in done["skipped"]] == ["on:16:none", "off:4:none", "keep:4:none"]
    assert done["skipped"][0]["why"].startswith("on failed: cannot start the daemon")
    assert all(s["why"].startswith("not switched after MPS on failed") for s in done["skipped"][1:])


def test_failed_trials_are_not_candidates():
    row = {"seconds": 10.0, "status": "ok", "reward": 0.5, "reused": False, "code": "fpn:x",
           "extra": {"started_at": 100.0}}
    failed = {**row, "code": "fpn:y", "status": "error", "reward": 0.0, "seconds": 0.1}
    stopped = {**row, "code": "fpn:z", "status": "stopped", "reward": 0.0}
    out = bench.summarize_run([row, failed, stopped], wall=36.0, slots=1)
    assert (out["candidates"], out["stopped"], out["failed"]) == (2, 1, 1)
    assert out["candidates_per_hour"] == pytest.approx(200.0)
    nothing = bench.summarize_run([failed], wall=36.0, slots=1)
    assert nothing["candidates"] == 0 and nothing["candidates_per_hour"] == 0.0
    assert math.isnan(bench.rate_ratio(100.0, nothing["candidates_per_hour"]))
