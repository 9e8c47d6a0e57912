"""`python -m search show|sample` and the exit-code contract of the dispatcher."""
import subprocess
import sys
from pathlib import Path

from detector.arch.grammar import parse

ROOT = Path(__file__).resolve().parents[2]


def _run(*args, cwd):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(cwd)})


def test_show_nasfcos_prints_the_published_output_plan_and_writes_a_diagram(tmp_path):
    out = _run("search", "show", "arch=nasfcos", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "P5 = b4 + b2 (computed at stride 32)" in text
    assert "P4 = b5 + b2 (computed at stride 8, resized to stride 16)" in text
    assert "P3 = b6 + b2 (computed at stride 8)" in text
    assert "deformable convolutions: 12" in text
    png = tmp_path / "nasfcos.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_code_exits_2_with_one_line_and_no_traceback(tmp_path):
    out = _run("search", "show", "arch=fpn:c3-c4-sep3-skip-sum+head:fcos", cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "only 1 block output" in out.stderr


def test_unknown_override_and_unknown_command_exit_2(tmp_path):
    for args in (("search", "show", "arch=nasfcos", "nosuchkey=1"), ("search", "frobnicate"),
                 ("search", "show", "controller=nosuch")):
        out = _run(*args, cwd=tmp_path)
        assert out.returncode == 2, args
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_sample_prints_n_distinct_valid_codes_deterministically(tmp_path):
    first = _run("search", "sample", "n=4", "seed=7", cwd=tmp_path)
    again = _run("search", "sample", "n=4", "seed=7", cwd=tmp_path)
    other = _run("search", "sample", "n=4", "seed=8", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.split()
    assert len(lines) == 4 and all(str(parse(line)) == line for line in lines)
    assert first.stdout == again.stdout != other.stdout
