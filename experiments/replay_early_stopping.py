"""Fidelity of early stopping: how often the stopping rule would drop the top-k of a set of trials.

Takes a set of *completed* trials with their learning curves -- the ``ok`` rows of search runs
made without a scheduler (every row's ``extra["curve"]`` holds ``[iteration, training loss]`` at each
report), or toy-proxy trials with synthetic curves (``--toy N``) -- and replays them many times
through the search's stopping rule (:mod:`search.early_stopping`, the rule ``executor=local`` uses,
which takes Ray Tune's decisions), each replay with its own seeded arrival order and its own
per-trial speeds, ``--workers`` trials running at once (asynchronous, as a search runs them). Per
replay it records which trials the rule stops, and reports:

- ``top-k kept``: the fraction of replays in which none of the top-k trials by final reward was
  stopped (the fidelity target of issue #23: >= 95% for the top-3);
- ``best kept``: the same for the best trial;
- ``iterations``: the training iterations the replay spends over those without stopping (a trial
  stopped at iteration t costs t), and the implied candidates-per-hour gain when a trial's cost is
  its iterations plus ``--eval-cost`` iterations' worth of evaluation (paid by completed trials only).

    python experiments/replay_early_stopping.py --toy 64 --curve-noise 0.3          # toy curves
    python experiments/replay_early_stopping.py --history runs/search/*/history.jsonl --grace 20
    # the ground truth: a fidelity study's proxy curves (end-to-end, 300 iterations, several seeds)
    # against the trained APs of the same architectures
    python experiments/replay_early_stopping.py --fidelity-dir experiments/search_quality/pretrained/e2e/curves \
        --ground-truth experiments/search_quality/pretrained/gpu_ground_truth --iters 300 --grace 50 100 150

``--json`` writes the per-setting numbers. CPU only; seconds.
"""
from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
for entry in (ROOT, ROOT / "experiments"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from search.early_stopping import StoppingSettings, make_rule, row_curve  # noqa: E402
from search.history import read_history  # noqa: E402
from study_fidelity import ground_truth_ap  # noqa: E402


class Trial(NamedTuple):
    key: str
    curves: tuple[tuple[tuple[float, float], ...], ...]  # its learning curves, one per proxy seed:
    #                                                      (iteration, training loss), ascending
    reward: float  # the final reward (ground truth of the replay)

    @property
    def last_iteration(self) -> int:
        return int(self.curves[0][-1][0])


def trials_from_history(paths: list[str]) -> list[Trial]:
    """The ``ok``, trained rows with a learning curve of at least two reports."""
    out = []
    for path in paths:
        for row in read_history(path).rows:
            curve = row_curve(row)
            if row["status"] == "ok" and not row["reused"] and len(curve) >= 2:
                out.append(Trial(f"{Path(path).parent.name}:{row['trial']}", (tuple(curve),), float(row["reward"])))
    return out


CURVE_KEYS = {"loss": "curves", "window": "window_curves"}  # --metric -> the study's key


def trials_from_fidelity(proxy_dir: str, ground_truth: str, iters: int, metric: str = "loss") -> list[Trial]:
    """The architectures of a fidelity study (``experiments/study_fidelity.py``): their proxy learning
    curves at ``iters`` iterations (one per proxy seed, ``proxy[iters]["curves"]`` of each
    ``<proxy_dir>/<label>.json``; with ``metric="window"`` the mean loss since the previous report,
    ``"window_curves"``, which studies since session 11 keep) and, as the reward, their mean trained
    AP in ``ground_truth`` (``<label>-s<seed>/metrics.json``). A replay gives each architecture one of
    its curves at random."""
    out = []
    for path in sorted(Path(proxy_dir).glob("*.json")):
        row = json.loads(path.read_text())
        scores = row.get("proxy", {}).get(str(iters), {})
        curves = tuple(tuple((float(it), float(loss)) for it, loss in curve)
                       for curve in scores.get(CURVE_KEYS[metric]) or [] if len(curve) >= 2)
        ap = ground_truth_ap(row["label"], Path(ground_truth))["AP"]
        if curves and ap == ap:  # not NaN: trained
            out.append(Trial(row["label"], curves, float(ap)))
    return out


def toy_trials(count: int, steps: int, curve_noise: float, noise: float, seed: int) -> list[Trial]:
    """``count`` random joint-space codes through the toy proxy with ``steps``-step learning curves."""
    from omegaconf import OmegaConf

    from detector.arch.space import space_from_cfg
    from detector.cli import compose
    from proxy_eval.toy import ToyProxy

    space_cfg = OmegaConf.to_container(compose("search", []).space, resolve=True)
    space = space_from_cfg(compose("search", []).space, "joint")
    toy = ToyProxy(space_cfg, noise=noise, seed=seed, weight_spread=0.5, curve_steps=steps, curve_noise=curve_noise)
    rng = random.Random(f"replay-codes:{seed}")
    out, seen = [], set()
    while len(out) < count:
        arch = space.decode(space.sample_tokens(rng))
        if str(arch) in seen:
            continue
        seen.add(str(arch))
        curve: list[tuple[float, float]] = []
        result = toy.evaluate(arch, seed=0, report=lambda v: curve.append((v["iteration"], v["loss"])))
        out.append(Trial(str(arch), (tuple(curve),), result.reward))
    return out


def smoothed(trials: list[Trial], window: int) -> list[Trial]:
    """The same trials with each report's loss replaced by the mean of its last ``window`` reports
    (fewer at a curve's start): whether averaging single-batch losses across reports ranks better."""
    def smooth(curve: tuple[tuple[float, float], ...]) -> tuple[tuple[float, float], ...]:
        return tuple((it, statistics.fmean(loss for _, loss in curve[max(0, i - window + 1):i + 1]))
                     for i, (it, _) in enumerate(curve))

    return [t._replace(curves=tuple(smooth(c) for c in t.curves)) for t in trials]


def replay(trials: list[Trial], settings: StoppingSettings, workers: int, seed: int,
           speed_spread: float = 0.3) -> dict[str, int]:
    """One asynchronous replay: trials arrive in a seeded order, ``workers`` at a time, each at its own
    seeded speed and with one of its curves picked at random; returns ``{key: iterations trained}`` (a stopped trial: where it stopped)."""
    rng = random.Random(f"replay:{seed}")
    order = trials[:]
    rng.shuffle(order)
    speed = {t.key: 1.0 + speed_spread * rng.uniform(-1, 1) for t in order}  # seconds per iteration
    curve_of = {t.key: t.curves[rng.randrange(len(t.curves))] for t in order}
    rule = make_rule(settings)
    events: list[tuple[float, int, str, int]] = []  # (time, tie-break, key, index of the report)
    trained: dict[str, int] = {}
    counter = 0

    def start(trial: Trial, now: float) -> None:
        nonlocal counter
        heapq.heappush(events, (now + curve_of[trial.key][0][0] * speed[trial.key], counter, trial.key, 0))
        counter += 1

    waiting = list(order)
    for _ in range(min(workers, len(waiting))):
        start(waiting.pop(0), 0.0)
    while events:
        now, _, key, index = heapq.heappop(events)
        curve = curve_of[key]
        iteration, loss = curve[index]
        stop = rule.on_report(key, iteration, loss) and iteration < settings.max_t
        last = index == len(curve) - 1
        if stop or last:
            rule.on_complete(key, iteration, loss)
            trained[key] = int(iteration)
            if waiting:
                start(waiting.pop(0), now)
            continue
        following = curve[index + 1][0]
        heapq.heappush(events, (now + (following - iteration) * speed[key], counter, key, index + 1))
        counter += 1
    return trained


def summarize(trials: list[Trial], settings: StoppingSettings, workers: int, replays: int, top_k: int,
              eval_cost: float) -> dict[str, float]:
    ranked = sorted(trials, key=lambda t: -t.reward)
    top = {t.key for t in ranked[:top_k]}
    best = ranked[0].key
    full = {t.key: t.last_iteration for t in trials}
    kept_top = kept_best = 0
    spent = total = 0.0
    stopped_fraction = 0.0
    for seed in range(replays):
        trained = replay(trials, settings, workers, seed)
        stopped = {k for k, it in trained.items() if it < full[k]}
        kept_top += not (stopped & top)
        kept_best += best not in stopped
        stopped_fraction += len(stopped) / len(trials)
        spent += sum(trained.values()) + eval_cost * (len(trials) - len(stopped))
        total += sum(full.values()) + eval_cost * len(trials)
    return {"trials": len(trials), "replays": replays, "workers": workers, "scheduler": settings.scheduler,
            "grace_period": settings.grace_period, "reduction_factor": settings.reduction_factor,
            "min_samples": settings.min_samples, "top_k": top_k,
            "top_k_kept": kept_top / replays, "best_kept": kept_best / replays,
            "stopped": stopped_fraction / replays, "cost_ratio": spent / total, "candidates_gain": total / spent}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--history", nargs="+", help="history.jsonl files of runs made without a scheduler")
    source.add_argument("--fidelity-dir", help="a fidelity study's proxy scores with curves (reward: --ground-truth)")
    parser.add_argument("--ground-truth", help="with --fidelity-dir: the trained runs, <label>-s<seed>/metrics.json")
    parser.add_argument("--iters", type=int, default=300, help="with --fidelity-dir: the proxy budget replayed")
    parser.add_argument("--metric", choices=sorted(CURVE_KEYS), default="loss",
                        help="with --fidelity-dir: what the rule sees at a report, the iteration's loss or "
                             "the mean loss since the previous report (window)")
    source.add_argument("--toy", type=int, help="this many toy trials with synthetic learning curves")
    parser.add_argument("--steps", type=int, default=12, help="toy: reports per curve")
    parser.add_argument("--curve-noise", type=float, default=0.3, help="toy: how unreliable early reports rank")
    parser.add_argument("--noise", type=float, default=0.02, help="toy: noise of the final reward")
    parser.add_argument("--scheduler", nargs="+", default=["asha", "median"], choices=["asha", "median"])
    parser.add_argument("--grace", type=int, nargs="+", default=None,
                        help="grace periods (iterations) to try; default: 1/6 and 1/3 of the curve length")
    parser.add_argument("--reduction-factor", type=float, default=3.0)
    parser.add_argument("--min-samples", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--replays", type=int, default=200)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--eval-cost", type=float, default=0.0,
                        help="evaluation cost of a completed trial, in training iterations")
    parser.add_argument("--smooth", type=int, default=1,
                        help="the rule sees the mean loss of each trial's last SMOOTH reports (1: the report itself)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    if args.fidelity_dir and not args.ground_truth:
        parser.exit(2, "error: --fidelity-dir needs --ground-truth (the folder of the trained runs)\n")
    if args.smooth < 1:
        parser.exit(2, f"error: --smooth must be >= 1 (reports averaged), got {args.smooth}\n")
    if args.history:
        trials = trials_from_history(args.history)
    elif args.fidelity_dir:
        trials = trials_from_fidelity(args.fidelity_dir, args.ground_truth, args.iters, args.metric)
    else:
        trials = toy_trials(args.toy, args.steps, args.curve_noise, args.noise, args.seed)
    if args.smooth > 1:
        trials = smoothed(trials, args.smooth)
    if len(trials) <= args.top_k:
        hint = (" (--metric window needs a study that kept window_curves: made since session 11)"
                if args.fidelity_dir and args.metric == "window" else "")
        parser.exit(2, f"error: only {len(trials)} trials with learning curves; need more than "
                       f"--top-k={args.top_k}{hint}\n")
    max_t = max(t.last_iteration for t in trials)
    graces = args.grace or sorted({max(1, max_t // 6), max(1, max_t // 3)})
    print(f"{len(trials)} trials, curves to iteration {max_t}, {args.replays} seeded replays each")
    print("| scheduler | grace | workers | top-%d kept | best kept | stopped | iterations spent | candidates gain |"
          % args.top_k)
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for scheduler in args.scheduler:
        for grace in graces:
            for workers in args.workers:
                settings = StoppingSettings(scheduler, max_t=max_t, grace_period=grace,
                                            reduction_factor=args.reduction_factor, min_samples=args.min_samples)
                out = summarize(trials, settings, workers, args.replays, args.top_k, args.eval_cost)
                results.append(out)
                print(f"| {scheduler} | {grace} | {workers} | {out['top_k_kept']:.1%} | {out['best_kept']:.1%} | "
                      f"{out['stopped']:.1%} | {out['cost_ratio']:.1%} | {out['candidates_gain']:.2f}x |")
    if args.json:
        source = args.history or ([args.fidelity_dir, args.ground_truth, args.iters] if args.fidelity_dir
                                  else f"toy {args.toy}")
        args.json.write_text(json.dumps({"source": source, "metric": args.metric, "smooth": args.smooth,
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
