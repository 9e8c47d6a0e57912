"""Search throughput: candidates per device-hour by trials per device, with and without early stopping.

Runs the real search (``search.run.run_search``, one stage, ``controller=random``, the same seed)
once per setting -- trials per device k in ``--trials-per-device`` (``search.workers=k``; with Ray
each trial asks for 1/k of the device and cores/k CPUs) x ``--scheduler`` -- and splits each run's
time, from the history it wrote:

An untimed one-candidate search runs first (``--no-warmup`` skips it), so that the first timed
setting does not pay the page cache and lazy imports for all.

- ``prepare``: the one-off proxy preparation (data generation, adaptation and feature cache for
  ``cached``; data and splits for ``end_to_end``), timed once before the runs and shared by all;
- ``start-up``: from the run's start to its first trial's start (Ray start, actors, evaluator set-up
  of the first trial in flight) plus the tail after the last trial (report, shutdown);
- per trial (summed over trials, as device-slot seconds): ``setup`` (model build, first batch: the
  time before the first report minus the iterations before it at the trial's own rate), ``train``
  (the training iterations), ``eval`` (after the last report: validation and scoring);
- ``idle/overhead``: k x (the span of the trials) minus the trials' seconds: slots with no trial
  running (the driver between trials, a stage waiting for its last trial, Ray scheduling).

Besides candidates per hour of the whole run, each setting's rate *after start-up* (candidates over
the span of its trials, in the JSON and on stderr) is the rate a longer search approaches: the
start-up is paid once per search, so at a small ``--budget`` it weighs most on the fastest settings.

Per-iteration data loading is inside ``train`` (the loop does not time it apart). With ``--device
cuda`` it also samples GPU utilisation and memory every second with ``nvidia-smi`` (the driver opens no
CUDA context of its own, so that switching MPS between runs stays clean).

    # CPU now (tiny: cached proxy of 12 iterations, 6 candidates per setting; loaded machine: ratios only)
    OMP_NUM_THREADS=1 python experiments/bench_search_throughput.py --budget 6 --trials-per-device 1 2 4 \\
        --scheduler none asha -- proxy_eval.iters=12 proxy_eval.report_every=3 search.stopping.grace_period=3
    # one GPU, the issue's setting (end-to-end proxy, Ray, 8 candidates per setting)
    python experiments/bench_search_throughput.py --device cuda --executor ray --budget 8 \\
        --trials-per-device 1 2 4 8 --scheduler none asha -- proxy_eval=end_to_end

``--settings`` replaces the cross product by an explicit list of ``mps:k:scheduler[:overrides]`` (mps:
``keep`` leaves the machine as it is, ``off`` stops the CUDA Multi-Process Service before the run,
``on`` starts it; overrides: ``key=value`` pairs joined by ``;``, for that setting's run only), so that the issue's baseline (Ray, 4 trials per GPU, no MPS) and settings with MPS run
side by side in one call; the first setting is the reference of the ratio column. MPS toggling
needs ``--executor ray`` (the driver opens no CUDA context; trials run in Ray's worker processes,
started anew by each run, so each run's workers see the MPS state chosen for it):

    # one GPU, next session: the baseline, then MPS with 8 and 16 trials, then ASHA on top
    python experiments/bench_search_throughput.py --device cuda --executor ray --budget 16 --no-warmup \
        --settings off:4:none on:8:none on:16:none on:16:asha --json $OUT/bench.json -- proxy_eval=end_to_end model.width=64

Extra ``key=value`` overrides after ``--`` go to every run. ``--json`` writes all numbers, rewritten
after every setting (a run cut by a time limit keeps the settings done).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def split_trial(row: dict) -> dict[str, float]:
    """``setup`` / ``train`` / ``eval`` seconds of one history row (see the module docstring)."""
    seconds = float(row.get("seconds") or 0.0)
    extra = row.get("extra") or {}
    curve, times = extra.get("curve") or [], extra.get("report_seconds") or []
    if len(curve) < 2 or len(times) != len(curve):
        return {"setup": 0.0, "train": seconds, "eval": 0.0}
    (first_it, _), (last_it, _) = curve[0][:2], curve[-1][:2]
    rate = (times[-1] - times[0]) / max(1e-9, last_it - first_it)  # seconds per iteration
    setup = max(0.0, times[0] - rate * first_it)
    train = times[-1] - setup
    return {"setup": setup, "train": train, "eval": max(0.0, seconds - times[-1])}


def setup_split(rows: list[dict]) -> dict[str, float] | None:
    """Mean seconds per trial of its set-up's parts: ``data`` (opening the datasets), ``build`` (the
    model), both from the end-to-end proxy's ``extra["setup_seconds"]``, and ``first_iterations`` (the
    rest of the set-up: the slow first steps -- kernel compilation, CUDA-graph capture, allocator
    growth); None where no trial recorded them (the cached proxy)."""
    parts = []
    for row in rows:
        phases = (row.get("extra") or {}).get("setup_seconds")
        if phases:
            data, build = float(phases.get("data", 0.0)), float(phases.get("build", 0.0))
            parts.append((data, build, max(0.0, split_trial(row)["setup"] - data - build)))
    if not parts:
        return None
    return {key: sum(p[i] for p in parts) / len(parts) for i, key in enumerate(("data", "build", "first_iterations"))}


def summarize_run(rows: list[dict], wall: float, slots: int) -> dict[str, float]:
    """Candidates per hour and the time split of one run (see the module docstring)."""
    trained = [r for r in rows if not r["reused"]]
    timed = [r for r in trained if (r.get("extra") or {}).get("started_at")]  # (a trial stopped by Ray
    starts = [r["extra"]["started_at"] for r in timed]                         # before session 12 has none)
    ends = [r["extra"]["started_at"] + float(r["seconds"] or 0.0) for r in timed]
    span = (max(ends) - min(starts)) if starts else wall
    parts = {"setup": 0.0, "train": 0.0, "eval": 0.0}
    for r in trained:
        for key, value in split_trial(r).items():
            parts[key] += value
    busy = sum(float(r["seconds"] or 0.0) for r in trained)
    device_s = slots * wall  # device-slot seconds of the run
    # a candidate is a trial that trained (to the end or until stopped); a failed trial is no candidate
    # (session 14: a run whose 32 trials all failed at once had counted as the fastest setting)
    candidates = sum(r["status"] in ("ok", "stopped") for r in trained)
    out = {"candidates": candidates, "stopped": sum(r["status"] == "stopped" for r in trained),
           "failed": len(trained) - candidates,
           "wall_s": wall, "candidates_per_hour": 3600.0 * candidates / wall,
           # without the run's fixed start-up and tail (paid once per search, whatever its length):
           # the rate a longer search approaches (trial actors' first-trial setup still included)
           "candidates_per_hour_after_startup": 3600.0 * candidates / span if span > 0 else math.nan,
           "startup_s": wall - span, "trial_s": busy,
           "best_reward": max((r["reward"] for r in trained if r["status"] == "ok"), default=math.nan),
           # proxy_eval.cuda_graph: trials that trained from a captured graph without a failed capture
           "graphed": sum(int((r.get("extra") or {}).get("cuda_graph_captures") or 0) > 0
                          and not (r.get("extra") or {}).get("cuda_graph_failures") for r in trained)}
    out.update({f"{key}_share": value / device_s for key, value in parts.items()})
    out["setup_split_s"] = setup_split(trained)
    out["startup_share"] = slots * (wall - span) / device_s
    out["idle_share"] = max(0.0, slots * span - busy) / device_s
    # each candidate's outcome, so that settings can be compared code by code (reward_agreement)
    out["trials"] = [{"code": r["code"], "status": r["status"], "reward": r["reward"],
                      "seconds": float(r["seconds"] or 0.0)} for r in trained]
    return out


def rate_ratio(rate: float, reference: float) -> float:
    """``rate / reference``; NaN where the reference trained nothing (all its trials failed)."""
    return rate / reference if reference > 0 else math.nan


def reward_agreement(first: list[dict], other: list[dict]) -> dict[str, float | int | None]:
    """How one setting's rewards agree with the first setting's on the codes both trained to the end
    (status ok in both): Spearman's rank correlation (None below 3 such codes, or where scipy is not
    installed (gpu_env.sh does not install it): the JSON's ``trials`` let it be computed later) and the
    largest absolute reward difference. Settings train the same codes (same seed), so a faster setting
    that keeps final quality ranks them alike."""
    try:
        from scipy.stats import spearmanr
    except ImportError:
        spearmanr = None
    first_reward = {t["code"]: t["reward"] for t in first if t["status"] == "ok"}
    pairs = [(first_reward[t["code"]], t["reward"]) for t in other
             if t["status"] == "ok" and t["code"] in first_reward]
    if not pairs:
        return {"codes": 0, "spearman": None, "max_abs_diff": None}
    a, b = zip(*pairs)
    rho = float(spearmanr(a, b).statistic) if len(pairs) >= 3 and spearmanr is not None else None
    return {"codes": len(pairs), "spearman": rho, "max_abs_diff": max(abs(x - y) for x, y in pairs)}


class GpuSampler:
    """Mean GPU utilisation (%) and peak memory used (MiB) over a run, from ``nvidia-smi`` every
    second (None without it). ``nvidia-smi`` rather than ``torch.cuda.utilization``: the latter
    needs pynvml and initialises CUDA in the driver."""

    QUERY = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]

    def __init__(self, enabled: bool) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True) if enabled else None

    def _run(self) -> None:
        import subprocess

        while not self._stop.wait(1.0):
            try:
                line = subprocess.run(self.QUERY, capture_output=True, text=True, timeout=10).stdout
                util, memory = (float(v) for v in line.splitlines()[0].split(","))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return  # no nvidia-smi (or no answer): no figure
            self.samples.append((util, memory))

    def __enter__(self) -> "GpuSampler":
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(u for u, _ in self.samples) / len(self.samples) if self.samples else None

    @property
    def peak_memory_mib(self) -> float | None:
        return max(m for _, m in self.samples) if self.samples else None


MPS_STATES = ("keep", "off", "on")


def parse_setting(text: str) -> tuple[str, int, str, tuple[str, ...]]:
    """``"on:16:asha"`` -> ``("on", 16, "asha", ())``; a fourth part holds ``key=value`` overrides of
    that setting only, joined by ``;`` (values may hold commas): ``"on:16:none:proxy_eval.cuda_graph=true"`` ->
    ``("on", 16, "none", ("proxy_eval.cuda_graph=true",))``. Raises ValueError with what is wrong."""
    parts = text.split(":", 3)
    overrides = tuple(item for item in parts[3].split(";") if item) if len(parts) == 4 else ()
    if len(parts) < 3 or parts[0] not in MPS_STATES or not parts[1].isdigit() or int(parts[1]) < 1 \
            or parts[2] not in ("none", "asha", "median") or any("=" not in item for item in overrides):
        raise ValueError(f"setting {text!r}: expected mps:trials:scheduler[:key=value;...], mps one of "
                         f"{'/'.join(MPS_STATES)}, trials a positive number, scheduler none/asha/median "
                         "(e.g. off:4:none or on:16:none:proxy_eval.cuda_graph=true)")
    return parts[0], int(parts[1]), parts[2], overrides


# Ray's trial workers, by their process titles; they exit asynchronously after ``ray.shutdown()``
RAY_WORKER_TITLE = "^ray::"


def pgrep(pattern: str) -> list[int]:
    """The processes whose command line matches ``pattern`` (``pgrep -f``), this one excepted; [] without pgrep."""
    import subprocess

    try:
        found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [int(p) for p in found.split() if p.isdigit() and int(p) != os.getpid()]


# the MPS server, which nvidia-smi lists among the GPU's compute processes
MPS_SERVER_NAME = "nvidia-cuda-mps-server"


def gpu_clients() -> dict[int, str]:
    """The GPU's compute processes but the MPS server and this one (pid -> name, as ``nvidia-smi
    --query-compute-apps`` lists them); {} without nvidia-smi. After a run, every one is left over from
    it: a trial worker not matched by Ray's title, or a process a trial started (in session 14 the
    daemon still waited for clients after Ray's workers had been stopped)."""
    import subprocess

    try:
        listed = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    clients = {}
    for line in listed.splitlines():
        pid, _, name = (part.strip() for part in line.partition(","))
        if pid.isdigit() and int(pid) != os.getpid() and MPS_SERVER_NAME not in name:
            clients[int(pid)] = name
    return clients


def stop_leftover_processes(find: Callable[[], Iterable[int]], wait_s: float = 20.0) -> int:
    """Wait up to ``wait_s`` for the processes that ``find()`` lists to exit, then SIGKILL those
    left; returns how many were killed (a pid that no longer exists, or is not ours, is not counted)."""
    import signal

    deadline = time.monotonic() + wait_s
    while list(find()) and time.monotonic() < deadline:
        time.sleep(0.5)
    killed = 0
    for pid in find():
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except OSError:
            pass
    return killed


def set_mps(state: str, timeout_s: float = 60.0, leftover: str = RAY_WORKER_TITLE) -> str:
    """Start (``on``) or stop (``off``) the CUDA Multi-Process Service of this machine; ``keep`` does
    nothing. Returns what happened, for the table; ``"... failed: why"`` where it could not (the
    caller skips that setting and every later one: the machine's MPS state is then unknown).

    ``quit`` waits for every MPS client to exit, so a process of the previous run still holding the
    GPU would keep it waiting for ever (session 12 lost a GPU call there): Ray's trial workers
    (``leftover``, a ``pgrep -f`` pattern), then whatever else ``nvidia-smi`` lists on the GPU
    (:func:`gpu_clients`), get 20 s to exit and are then killed, and ``quit`` waits no longer than
    ``timeout_s``; if it still times out, the failure names the clients left."""
    import subprocess

    if state == "keep":
        return "as found"
    if state == "on":
        try:
            done = subprocess.run(["nvidia-cuda-mps-control", "-d"], capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"on failed: {type(err).__name__}: {str(err)[:80]}"
        # exit status 1 with "already running" is fine too
        running = done.returncode == 0 or "running" in (done.stderr + done.stdout).lower()
        return "on" if running else f"on failed: {(done.stderr or done.stdout).strip()[:80]}"
    killed = stop_leftover_processes(lambda: pgrep(leftover))
    killed += stop_leftover_processes(gpu_clients)
    try:
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        clients = ", ".join(f"{pid} {name}" for pid, name in gpu_clients().items()) or "none that nvidia-smi lists"
        return f"off failed: the MPS daemon did not quit in {timeout_s:.0f} s (clients still attached: {clients[:160]})"
    except OSError as err:
        return f"off failed: {type(err).__name__}: {str(err)[:80]}"
    time.sleep(2.0)  # the server exits after its clients; the next run's workers must not join it
    return "off" if not killed else f"off ({killed} leftover process(es) killed)"


def run_overrides(args: argparse.Namespace, k: int, scheduler: str, run_dir: Path) -> list[str]:
    cores = os.cpu_count() or 1
    overrides = [f"executor={args.executor}", f"device={args.device}", "search.stages=[fpn]",
                 f"search.budget={args.budget}", f"search.workers={k}", "controller=random", f"seed={args.seed}",
                 f"search.scheduler={scheduler}", f"search.run_dir={run_dir}", "search.retries=0"]
    if args.executor == "ray":
        overrides += [f"ray.cpus_per_trial={max(1, cores // k)}",
                      f"ray.gpus_per_trial={1.0 / k if args.device.startswith('cuda') else 0}"]
    return overrides + list(args.overrides)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials-per-device", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--scheduler", nargs="+", default=["none", "asha"], choices=["none", "asha", "median"])
    parser.add_argument("--budget", type=int, default=4, help="candidates per setting")
    parser.add_argument("--executor", default="local", choices=["local", "ray"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the untimed one-candidate search run before the timed ones")
    parser.add_argument("--warmup-iters", type=int, default=None, metavar="N",
                        help="the warm-up search's trial trains N iterations (default: as the timed runs); it only "
                             "needs to run every kernel once")
    parser.add_argument("--settings", nargs="+", default=None, metavar="MPS:K:SCHEDULER",
                        help="explicit settings instead of trials-per-device x scheduler (see the docstring)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run (after --)")
    args = parser.parse_args(argv)
    try:
        settings = ([parse_setting(text) for text in args.settings] if args.settings else
                    [("keep", k, scheduler, ()) for scheduler in args.scheduler for k in args.trials_per_device])
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    if any(mps != "keep" for mps, _, _, _ in settings) and args.executor != "ray":
        parser.exit(2, "error: settings that switch MPS need --executor ray (local trials share the driver's "
                       "CUDA context); use keep:K:SCHEDULER with --executor local\n")

    import logging

    from detector.cli import compose
    from proxy_eval.build import prepare_proxy
    from search.history import read_history
    from search.run import run_search

    logging.basicConfig(level=logging.WARNING)
    workdir = Path(tempfile.mkdtemp(prefix="bench-search-"))
    start = time.perf_counter()
    prepare_proxy(compose("search", run_overrides(args, 1, "none", workdir / "prepare")))
    prepare_s = time.perf_counter() - start
    print(f"prepare (one-off, shared by every run): {prepare_s:.1f} s; runs under {workdir}")
    if args.warmup:  # untimed: page cache, imports, Triton's kernel cache: what only the first run would pay
        begin = time.perf_counter()
        run_search(compose("search", run_overrides(args, 1, "none", workdir / "warmup")
                           + ["search.budget=1", f"seed={args.seed + 1000}"]
                           + ([f"proxy_eval.iters={args.warmup_iters}", f"proxy_eval.report_every={args.warmup_iters}"]
                              if args.warmup_iters else [])))
        print(f"warm-up search (one candidate, untimed): {time.perf_counter() - begin:.1f} s", flush=True)
    print("| MPS | trials/device | scheduler | candidates (stopped) | wall s | candidates/h | vs first | start-up | "
          "setup | train | eval | idle/overhead | GPU util | best reward |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    results: list[dict] = []
    skipped: list[dict] = []

    def write_json() -> None:  # after every setting: a call's time limit keeps what is done
        if args.json:
            args.json.write_text(json.dumps({"prepare_s": prepare_s, "argv": sys.argv[1:], "results": results,
                                             "skipped": skipped}, indent=1))

    # the first failed MPS switch: after it the machine's MPS state is unknown and no setting runs
    # (session 14: a daemon left half-way through quitting hid the GPU from the next setting's trials)
    mps_failure = None
    for index, (mps, k, scheduler, extra) in enumerate(settings):
        why_skipped = f"not switched after MPS {mps_failure}" if mps_failure else None
        if why_skipped is None:
            mps_state = set_mps(mps)
            if "failed" in mps_state:  # its trials would not run as the setting says: no row for it
                mps_failure = why_skipped = mps_state
        if why_skipped:
            print(f"  (setting {mps}:{k}:{scheduler} skipped: {why_skipped})", file=sys.stderr, flush=True)
            skipped.append({"setting": f"{mps}:{k}:{scheduler}", "overrides": list(extra), "why": why_skipped})
            write_json()
            continue
        run_dir = workdir / f"{index}-mps-{mps}-k{k}-{scheduler}"
        cfg = compose("search", run_overrides(args, k, scheduler, run_dir) + list(extra))
        with GpuSampler(args.device.startswith("cuda")) as gpu:
            begin = time.perf_counter()
            run_search(cfg)
            wall = time.perf_counter() - begin
        out = {"mps": mps_state, "trials_per_device": k, "scheduler": scheduler, "overrides": list(extra),
               "gpu_util": gpu.mean,
               "gpu_peak_memory_mib": gpu.peak_memory_mib,
               **summarize_run(read_history(run_dir / "history.jsonl").rows, wall, k)}
        first = results[0] if results else out  # the reference of the ratios and the reward comparison
        out["ratio"] = rate_ratio(out["candidates_per_hour"], first["candidates_per_hour"])
        out["ratio_after_startup"] = rate_ratio(out["candidates_per_hour_after_startup"],
                                                first["candidates_per_hour_after_startup"])
        out["vs_first"] = reward_agreement(first["trials"], out["trials"])
        results.append(out)
        util = "-" if out["gpu_util"] is None else f"{out['gpu_util']:.0f}%"
        failed = f", {out['failed']} failed" if out["failed"] else ""
        print(f"| {mps_state} | {k} | {scheduler}{''.join(' ' + o for o in extra)} | {out['candidates']} ({out['stopped']}{failed}) | {wall:.1f} | "
              f"{out['candidates_per_hour']:.0f} | {out['ratio']:.2f}x | {out['startup_share']:.0%} | "
              f"{out['setup_share']:.0%} | {out['train_share']:.0%} | {out['eval_share']:.0%} | "
              f"{out['idle_share']:.0%} | {util} | {out['best_reward']:.4f} |", flush=True)
        print(f"  (after the run's start-up of {out['startup_s']:.1f} s: {out['candidates_per_hour_after_startup']:.0f} "
              f"candidates/h, {out['ratio_after_startup']:.2f}x the first setting's)", file=sys.stderr, flush=True)
        if out["setup_split_s"]:
            split = out["setup_split_s"]
            print(f"  (set-up per trial, mean: data {split['data']:.1f} s, model build {split['build']:.1f} s, "
                  f"first iterations {split['first_iterations']:.1f} s)", file=sys.stderr, flush=True)
        agree = out["vs_first"]
        if results[1:] and agree["codes"]:
            rho = "n/a" if agree["spearman"] is None else f"{agree['spearman']:.2f}"
            print(f"  (rewards vs the first setting on the {agree['codes']} codes both trained to the end: "
                  f"Spearman {rho}, largest difference {agree['max_abs_diff']:.4f})", file=sys.stderr, flush=True)
        if extra:
            print(f"  (overrides {' '.join(extra)}: {out['graphed']} of {out['candidates']} trials trained from a "
                  "CUDA graph)", file=sys.stderr, flush=True)
        write_json()


if __name__ == "__main__":
    main()
