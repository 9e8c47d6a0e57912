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
