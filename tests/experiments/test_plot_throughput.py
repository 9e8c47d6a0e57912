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
    results = plot_tool.load_results([first, second])
    assert [r["candidates_per_hour"] for r in results] == [266.0, 616.0, 714.0]
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
    table = plot_tool.comparison_table(plot_tool.load_results([base, fast])).splitlines()
    assert table[2] == "| no MPS, 4/GPU, none | 4 (0) | 300 | 1.00x | 0.3000 | a | - | - |"
    assert table[3] == "| MPS, 16/GPU, asha | 4 (1) | 960 | 3.20x | 0.3100 | a | 1.00 (3) | 0.0200 |"


def test_baseline_named_by_its_setting_is_the_reference_when_measured_after_the_fast_setting(tmp_path, capsys):
    # one call that measured the fast setting first (it pays the kernel compilation), then the baseline
    bench = _bench(tmp_path / "a.json",
                   ("on", 16, "none", 900.0, {"overrides": ["proxy_eval.cuda_graph=true"], "candidates": 32, "stopped": 0}),
                   ("off (2 leftover worker(s) killed)", 4, "none", 300.0, {"candidates": 32, "stopped": 0}))
    results = plot_tool.load_results([bench])
    assert plot_tool.find_baseline(results, None) == 0
    assert plot_tool.find_baseline(results, "off:4:none") == 1
    assert plot_tool.find_baseline(results, "on:16:none:proxy_eval.cuda_graph=true") == 0
    table = plot_tool.comparison_table(results, 1).splitlines()
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
    assert "--baseline off:4:none: 0 settings match (measured: on:16:none, keep:4:none)" in err and not out.exists()
