"""Shared machinery of the fault-injection suite (tests/test_faults_*.py, experiments/fault_suite.py).

Real faults, at moments chosen precisely:

- :func:`start_cli` runs ``python -m <app> <args>`` in a subprocess, optionally with a *pause
  point*: the subprocess is started through this file (``python tests/helpers/faults.py pause ...``),
  which wraps one function (``module:Qualified.name``) so that before or after its N-th call the
  process writes a marker file and then waits (until a release file appears, or forever). The
  test meanwhile SIGKILLs it (:func:`sigkill`) - a kill at an exact moment of the real program,
  with nothing mocked - or releases it to let it finish.
- :func:`run_cli_in_process` calls :func:`detector.cli.dispatch` like ``python -m <app>`` does
  and returns the exit code with what went to stdout and stderr (for fuzzing thousands of inputs
  without a process start each).
- :func:`file_size_limit` / :func:`disk_full_on_call` / :func:`limit_file_size_in_child` make a
  chosen write hit a full disk for real (RLIMIT_FSIZE: the kernel cuts the write short, then fails
  it), in this process or in a CLI subprocess.
- :func:`ray_worker_kill_hook` makes a Ray worker SIGKILL itself inside a chosen evaluation.
- :func:`memory_limit` / :func:`time_limit` keep a fuzz case from taking the machine down.
- :func:`parse_history_lines`, :func:`rows_lost`, :func:`files_changed` measure "no data lost";
  :func:`record_fault` reports it to experiments/fault_suite.py.

This is test machinery only, so it lives under tests/ and not in the package.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[2]
THIS_FILE = Path(__file__).resolve()


# ---------------------------------------------------------------------- subprocesses
def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: the project importable, and as many torch threads as
    this process uses (CPU results are bitwise comparable only for equal thread counts)."""
    threads = "1"
    try:
        import torch

        threads = str(torch.get_num_threads())
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    env = {**os.environ, "OMP_NUM_THREADS": threads, "TQDM_DISABLE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


@dataclass(frozen=True)
class PausePoint:
    """Pause the subprocess ``when`` ("before" / "after") the ``call``-th call of ``target``.

    ``target`` is ``"package.module:Name"`` or ``"package.module:Class.method"``. At that moment
    the process writes ``marker`` (JSON: pid, target, call) and waits until ``release`` exists
    (never, when ``release`` is None: the test kills it).
    """

    target: str
    marker: Path
    call: int = 1
    when: str = "after"
    release: Path | None = None

    def argv(self) -> list[str]:
        args = ["pause", "--target", self.target, "--call", str(self.call), "--when", self.when,
                "--marker", str(self.marker)]
        if self.release is not None:
            args += ["--release", str(self.release)]
        return args


def start_cli(app: str, *args: str, pause: PausePoint | None = None, cwd: Path = ROOT,
              env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``python -m <app> <args>`` (through a pause point when given); pipes are text."""
    if pause is None:
        command = [sys.executable, "-m", app, *args]
    else:
        command = [sys.executable, str(THIS_FILE), *pause.argv(), "--", app, *args]
    return subprocess.Popen(command, cwd=cwd, env=env or cli_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run_cli(app: str, *args: str, timeout: float = 300, cwd: Path = ROOT,
            preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m <app> <args>`` to the end; returns the completed process (text output)."""
    return subprocess.run([sys.executable, "-m", app, *args], cwd=cwd, env=cli_env(), text=True,
                          capture_output=True, timeout=timeout, preexec_fn=preexec_fn)


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen | None, what: str,
               timeout: float = 180.0, poll: float = 0.02) -> None:
    """Poll ``condition`` until true; fails if ``proc`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the process ended (rc {proc.returncode}) before {what}:\n{err[-3000:]}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_for_marker(pause: PausePoint, proc: subprocess.Popen, timeout: float = 180.0) -> dict:
    """Wait until the subprocess reached its pause point; returns the marker's content."""
    wait_until(pause.marker.exists, proc, f"the pause point {pause.target} #{pause.call}", timeout)
    return json.loads(pause.marker.read_text())


def sigkill(proc: subprocess.Popen) -> tuple[str, str]:
    """SIGKILL ``proc`` (by its own pid) and reap it; returns its stdout and stderr."""
    os.kill(proc.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"expected death by SIGKILL, got rc {proc.returncode}"
    return out, err


# ---------------------------------------------------------------------- in-process CLI
@dataclass(frozen=True)
class CliOutcome:
    code: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def run_cli_in_process(app: str, argv: Sequence[str]) -> CliOutcome:
    """``python -m <app> <argv>`` in this process: :func:`detector.cli.dispatch` with the app's
    commands, stdout/stderr captured, ``SystemExit`` turned into the exit code (0 if none).

    Any other exception escapes: for the CLI contract that is a crash (exit 1 with a traceback).
    """
    from detector.cli import dispatch

    commands = importlib.import_module(f"{app}.__main__").COMMANDS
    config_name = "search" if app == "search" else "train"
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            dispatch(app, config_name, commands, list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return CliOutcome(code, out.getvalue(), err.getvalue())


def assert_one_line_bad_input(outcome: CliOutcome | subprocess.CompletedProcess, context: str = "",
                              strict: bool = True) -> str:
    """The bad-input contract: exit 2, the error as one stderr line ``error: ...``, no traceback.

    ``strict``: that line is all of stderr (input refused before any work). Otherwise progress
    bars and log records written before the failure may precede it, the error line coming last.
    Returns the error line.
    """
    code = outcome.code if isinstance(outcome, CliOutcome) else outcome.returncode
    stderr = outcome.stderr
    lines = [line for line in stderr.split("\n") if line.strip()]
    assert code == 2, f"{context}: exit {code}, stderr {stderr[-2000:]!r}"
    assert "Traceback" not in stderr, f"{context}: traceback on stderr {stderr[-2000:]!r}"
    assert lines and lines[-1].startswith("error: ") and "\r" not in lines[-1], \
        f"{context}: stderr does not end with one error line: {stderr[-2000:]!r}"
    assert sum(line.startswith("error:") for line in lines) == 1, f"{context}: several error lines {stderr!r}"
    if strict:
        assert len(lines) == 1, f"{context}: stderr is more than the error line: {stderr[-2000:]!r}"
    return lines[-1]


# ---------------------------------------------------------------------- run-dir checks
def parse_history_lines(path: Path) -> list[dict]:
    """Every line of ``history.jsonl`` as a JSON object; AssertionError naming the first bad line."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise AssertionError(f"{path}: line {number} is not JSON ({err}): {line[:120]!r}") from None
        assert isinstance(row, dict), f"{path}: line {number} is not an object"
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- guards for fuzzing
class CaseTimeout(BaseException):
    """A fuzz case ran past its time limit (a BaseException: code under test cannot swallow it)."""


@contextlib.contextmanager
def memory_limit(extra_bytes: int):
    """While active, this process may grow its address space by at most ``extra_bytes``
    (RLIMIT_AS): an input that makes the code allocate without bound raises MemoryError here
    instead of waking the kernel's OOM killer."""
    import resource

    with open("/proc/self/status") as f:
        size_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size_kb * 1024 + extra_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise :class:`CaseTimeout` in the main thread after ``seconds`` (SIGALRM)."""
    def expire(signum, frame):
        raise CaseTimeout(f"still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------- a full disk
@contextlib.contextmanager
def file_size_limit(max_bytes: int):
    """While active, no file of this process can grow past ``max_bytes`` (RLIMIT_FSIZE).

    A real kernel fault, no root needed: a write crossing the limit is cut short, then fails with
    EFBIG ("File too large") - the same short write a full disk (ENOSPC) gives. SIGXFSZ is ignored
    meanwhile so that the write fails instead of the process dying. Keep the window small: it
    applies to every file this process writes, pytest's own included.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def disk_full_on_call(monkeypatch, owner: object, attr: str, call: int,
                      limit: Callable[..., int] = lambda *args, **kwargs: 256) -> list[int]:
    """Make the ``call``-th call of ``owner.attr`` run with the disk "full": under a file-size
    limit of ``limit(*args, **kwargs)`` bytes. Returns a list that counts the calls made."""
    original = getattr(owner, attr)
    calls: list[int] = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) != call:
            return original(*args, **kwargs)
        with file_size_limit(limit(*args, **kwargs)):
            return original(*args, **kwargs)

    monkeypatch.setattr(owner, attr, wrapper)
    return calls


def limit_file_size_in_child(max_bytes: int) -> Callable[[], None]:
    """A ``preexec_fn`` giving a subprocess a file-size limit (and SIGXFSZ ignored, inherited by exec)."""
    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return apply


# ---------------------------------------------------------------------- Ray workers
RAY_FAULT_DIR = "NASFCOS_FAULT_DIR"
RAY_KILL_EVALUATION = "NASFCOS_FAULT_KILL_EVALUATION"


def ray_worker_kill_hook() -> None:
    """A Ray ``worker_process_setup_hook``: the worker SIGKILLs itself inside the N-th evaluation.

    Evaluations are numbered across all worker processes by files ``evaluation-<n>`` (holding the
    code) in ``$NASFCOS_FAULT_DIR``; the process starting evaluation ``$NASFCOS_FAULT_KILL_EVALUATION``
    dies by SIGKILL before returning a result, exactly as a worker killed mid-trial.
    """
    fault_dir = Path(os.environ[RAY_FAULT_DIR])
    kill_at = int(os.environ[RAY_KILL_EVALUATION])
    from proxy_eval.toy import ToyProxy

    real_evaluate = ToyProxy.evaluate

    def evaluate(self, arch, seed=0, report=None):
        number = len(list(fault_dir.glob("evaluation-*"))) + 1
        (fault_dir / f"evaluation-{number}").write_text(str(arch))
        if number == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_evaluate(self, arch, seed, report)

    ToyProxy.evaluate = evaluate


# ---------------------------------------------------------------------- accounting
def rows_lost(before: Sequence[dict], after: Sequence[dict]) -> int:
    """History rows present before a fault that are missing or changed after it (must be 0)."""
    return sum(1 for i, row in enumerate(before) if i >= len(after) or after[i] != row)


def files_changed(before: dict[str, bytes], directory: Path) -> int:
    """Files of ``before`` (name -> bytes) that are gone or different in ``directory`` now."""
    return sum(1 for name, data in before.items()
               if not (directory / name).is_file() or (directory / name).read_bytes() != data)


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every regular file directly in ``directory`` (the lock file aside), name -> bytes."""
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file() and p.name != ".lock"}


def record_fault(record_property: Callable[[str, object], None], injected: int, data_lost: int | None) -> None:
    """Report a fault case to experiments/fault_suite.py (junit XML properties): how many faults
    were injected and how much data written before them was lost (None: no data at stake)."""
    record_property("faults_injected", injected)
    if data_lost is not None:
        record_property("data_lost", data_lost)


# ---------------------------------------------------------------------- the pause wrapper
def _resolve(target: str) -> tuple[object, str]:
    module_name, _, qualname = target.partition(":")
    owner: object = importlib.import_module(module_name)
    *path, attr = qualname.split(".")
    for name in path:
        owner = getattr(owner, name)
    return owner, attr


def install_pause(target: str, call: int, when: str, marker: Path, release: Path | None) -> None:
    """Wrap ``target`` so that before/after its ``call``-th call the process marks and waits."""
    owner, attr = _resolve(target)
    original = getattr(owner, attr)
    calls = 0

    def pause() -> None:
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "target": target, "call": calls}))
        os.replace(tmp, marker)
        while release is None or not release.exists():
            time.sleep(0.05)

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == call and when == "before":
            pause()
        result = original(*args, **kwargs)
        if calls == call and when == "after":
            pause()
        return result

    wrapper.__wrapped__ = original
    setattr(owner, attr, staticmethod(wrapper) if isinstance(owner, type) and
            isinstance(owner.__dict__.get(attr), staticmethod) else wrapper)


def _main(argv: list[str]) -> None:
    if "--" not in argv:
        raise SystemExit("usage: faults.py pause --target M:Q [--call N] [--when before|after] --marker F "
                         "[--release F] -- <app> <args...>")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="faults.py")
    parser.add_argument("mode", choices=["pause"])
    parser.add_argument("--target", required=True)
    parser.add_argument("--call", type=int, default=1)
    parser.add_argument("--when", choices=["before", "after"], default="after")
    parser.add_argument("--marker", type=Path, required=True)
    parser.add_argument("--release", type=Path, default=None)
    options = parser.parse_args(argv[:split])
    app, *app_args = argv[split + 1:]
    sys.path[0] = str(ROOT)  # run as a script: import the project, not tests/
    install_pause(options.target, options.call, options.when, options.marker, options.release)
    sys.argv = [f"{app}/__main__.py", *app_args]
    runpy.run_module(app, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
