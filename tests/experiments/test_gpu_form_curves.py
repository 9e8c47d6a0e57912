"""experiments/gpu_form_curves.py: the AP curves of GPU runs, finished or cut by a call's time limit."""
import json

import pytest

from experiment_scripts import load_experiment


@pytest.fixture(scope="module")
def curves():
    return load_experiment("gpu_form_curves")


def write_run(folder, name, aps, final=None):
    run = folder / name
    run.mkdir(parents=True)
    lines = [{"step": 500 * (i + 1), "val/AP": ap} for i, ap in enumerate(aps)]
    lines.insert(1, {"step": 600, "loss": 1.0})  # a training record without AP is skipped
    (run / "log.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    if final is not None:
        (run / "metrics.json").write_text(json.dumps({"AP": final}))


def test_a_cut_run_reports_its_last_evaluation_and_no_final_ap(curves, tmp_path):
    write_run(tmp_path, "a-s0", [0.2, 0.5, 0.45])
    write_run(tmp_path, "b-s0", [0.3, 0.52], final=0.52)
    cut, done = curves.summarize(tmp_path / "a-s0"), curves.summarize(tmp_path / "b-s0")
    assert (cut["last_step"], cut["last_ap"], cut["best_ap"], cut["final_ap"]) == (1500, 0.45, 0.5, None)
    assert done["final_ap"] == 0.52 and done["curve"] == [(500, 0.3), (1000, 0.52)]


def test_the_table_marks_cut_runs_and_the_plot_is_written(curves, tmp_path):
    write_run(tmp_path / "runs", "s9-x-s0", [0.2, 0.4])
    write_run(tmp_path / "runs", "s9-y-s0", [0.3], final=0.3)
    write_run(tmp_path / "runs", "other-s0", [0.9], final=0.9)  # not matched by --match
    assert curves.main(["--runs", str(tmp_path / "runs"), "--match", "s9-*", "--out", str(tmp_path), "--name", "t"]) == 0
    table = (tmp_path / "t.md").read_text()
    assert "| s9-x-s0 | 1000 | 0.4000 | 0.4000 | cut |" in table and "| s9-y-s0 | 500 | 0.3000 | 0.3000 | 0.3000 |" in table
    assert "other-s0" not in table and (tmp_path / "t.png").stat().st_size > 0


def test_no_matching_run_is_exit_2(curves, tmp_path, capsys):
    assert curves.main(["--runs", str(tmp_path), "--match", "s9-*", "--out", str(tmp_path), "--name", "t"]) == 2
    assert "no run folder matching" in capsys.readouterr().err
