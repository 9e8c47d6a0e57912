"""experiments/plot_throughput.py: the bar chart of the throughput bench's settings."""
from __future__ import annotations

import json

from experiment_scripts import load_experiment

plot_tool = load_experiment("plot_throughput")


def _bench(path, *rows):
    path.write_text(json.dumps({"results": [
        {"mps": mps, "trials_per_device": k, "scheduler": sched, "candidates_per_hour": rate, **extra}
        for mps, k, sched, rate, extra in rows]}))
    return path


def test_settings_of_several_bench_files_become_one_chart_with_the_first_as_baseline(tmp_path):
    first = _bench(tmp_path / "a.json", ("off", 4, "none", 266.0, {}), ("on", 16, "none", 616.0, {}))
    second = _bench(tmp_path / "b.json", ("on", 16, "asha", 714.0, {"overrides": ["proxy_eval.cuda_graph=true"]}))
    results, sources = plot_tool.load_results([first, second])
    assert [r["candidates_per_hour"] for r in results] == [266.0, 616.0, 714.0] and sources == [0, 0, 1]
    assert plot_tool.setting_label(results[0]) == "no MPS, 4/GPU, none"
    assert plot_tool.setting_label(results[2]) == "MPS, 16/GPU, asha\nproxy_eval.cuda_graph=true"
    out = tmp_path / "chart.png"
    assert plot_tool.main([str(first), str(second), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bench_file_without_settings_is_exit_2_and_writes_nothing(tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"results": []}))
    out = tmp_path / "chart.png"
    assert plot_tool.main([str(empty), "--out", str(out)]) == 2
    assert "no settings" in capsys.readouterr().err and not out.exists()


def test_the_table_checks_equal_quality_across_calls_code_by_code(tmp_path):
    def trials(*pairs):
        return [{"code": c, "status": st, "reward": rw, "seconds": 1.0} for c, rw, st in pairs]

    base = _bench(tmp_path / "a.json", ("off", 4, "none", 300.0, {
        "candidates": 4, "stopped": 0,
        "trials": trials(("a", 0.30, "ok"), ("b", 0.20, "ok"), ("c", 0.10, "ok"), ("d", 0.05, "ok"))}))
    fast = _bench(tmp_path / "b.json", ("on", 16, "asha", 960.0, {
        "candidates": 4, "stopped": 1,
        "trials": trials(("a", 0.31, "ok"), ("b", 0.18, "ok"), ("c", 0.12, "ok"), ("d", 0.0, "stopped"))}))
    table = plot_tool.comparison_table(plot_tool.load_results([base, fast])[0]).splitlines()
    assert table[2] == "| no MPS, 4/GPU, none | 4 (0) | 300 | 1.00x | 0.3000 | a | - | - |"
    assert table[3] == "| MPS, 16/GPU, asha | 4 (1) | 960 | 3.20x | 0.3100 | a | 1.00 (3) | 0.0200 |"


def test_baseline_named_by_its_setting_is_the_reference_when_measured_after_the_fast_setting(tmp_path, capsys):
    # one call that measured the fast setting first (it pays the kernel compilation), then the baseline
    bench = _bench(tmp_path / "a.json",
                   ("on", 16, "none", 900.0, {"overrides": ["proxy_eval.cuda_graph=true"], "candidates": 32, "stopped": 0}),
                   ("off (2 leftover worker(s) killed)", 4, "none", 300.0, {"candidates": 32, "stopped": 0}))
    results, sources = plot_tool.load_results([bench])
    assert plot_tool.find_baselines(results, sources, None) == [0, 0]
    assert plot_tool.find_baselines(results, sources, "off:4:none") == [1, 1]
    assert plot_tool.find_baselines(results, sources, "on:16:none:proxy_eval.cuda_graph=true") == [0, 0]
    table = plot_tool.comparison_table(results, [1, 1]).splitlines()
    assert table[2].startswith("| MPS, 16/GPU, none proxy_eval.cuda_graph=true | 32 (0) | 900 | 3.00x |")
    assert table[3].startswith("| no MPS, 4/GPU, none | 32 (0) | 300 | 1.00x |")
    out = tmp_path / "chart.png"
    assert plot_tool.main([str(bench), "--baseline", "off:4:none", "--out", str(out)]) == 0
    assert "| 900 | 3.00x |" in capsys.readouterr().out and out.exists()


def test_a_baseline_setting_that_was_not_measured_is_exit_2_naming_what_was(tmp_path, capsys):
    bench = _bench(tmp_path / "a.json", ("on", 16, "none", 900.0, {}), ("as found", 4, "none", 300.0, {}))
    out = tmp_path / "chart.png"
    assert plot_tool.main([str(bench), "--baseline", "off:4:none", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--baseline off:4:none: 0 settings match, not one nor one per file (measured: on:16:none, keep:4:none)" \
        in err and not out.exists()


def test_where_each_call_measured_the_baseline_each_setting_is_against_its_own_calls(tmp_path, capsys):
    # two calls on one machine whose baselines differ by the host's mood: each ratio stays within its call
    call4 = _bench(tmp_path / "call4.json", ("off", 4, "none", 320.0, {"candidates": 32, "stopped": 0}),
                   ("on", 16, "none", 1280.0, {"candidates": 32, "stopped": 0}))
    call5 = _bench(tmp_path / "call5.json", ("off (1 leftover process(es) killed)", 4, "none", 400.0,
                                             {"candidates": 32, "stopped": 0}),
                   ("on", 16, "median", 1800.0, {"candidates": 32, "stopped": 13}))
    results, sources = plot_tool.load_results([call4, call5])
    assert plot_tool.find_baselines(results, sources, "off:4:none") == [0, 0, 2, 2]
    table = plot_tool.comparison_table(results, [0, 0, 2, 2]).splitlines()
    assert "| 1280 | 4.00x |" in table[3] and "| 1800 | 4.50x |" in table[5]
    out = tmp_path / "chart.png"
    assert plot_tool.main([str(call4), str(call5), "--baseline", "off:4:none", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 1280 | 4.00x |" in printed and "| 1800 | 4.50x |" in printed and out.exists()
    # a call without the baseline leaves its settings without a reference: one line, exit 2
    call3 = _bench(tmp_path / "call3.json", ("on", 16, "none", 1300.0, {}))
    assert plot_tool.main([str(call3), str(call4), str(call5), "--baseline", "off:4:none", "--out", str(out)]) == 2
    assert "2 settings match, not one nor one per file" in capsys.readouterr().err


def test_a_baseline_measured_twice_in_one_call_is_ambiguous(tmp_path, capsys):
    bench = _bench(tmp_path / "a.json", ("off", 4, "none", 300.0, {}), ("off", 4, "none", 310.0, {}))
    other = _bench(tmp_path / "b.json", ("on", 16, "none", 900.0, {}))
    assert plot_tool.main([str(bench), str(other), "--baseline", "off:4:none", "--out", str(tmp_path / "c.png")]) == 2
    assert "2 settings match" in capsys.readouterr().err


def test_a_baseline_that_trained_nothing_gives_no_ratio_instead_of_a_crash(tmp_path, capsys):
    # every baseline trial failed (the bench counts no candidate): the ratios are undefined, not infinite
    bench = _bench(tmp_path / "a.json", ("off", 4, "none", 0.0, {"candidates": 0, "stopped": 0}),
                   ("on", 16, "none", 900.0, {"candidates": 32, "stopped": 0}))
    out = tmp_path / "chart.png"
    assert plot_tool.main([str(bench), "--out", str(out)]) == 0
    assert "| 900 | - |" in capsys.readouterr().out and out.exists()
