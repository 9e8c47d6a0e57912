"""Search quality: do the searchers beat random search on real proxy trials, and does the proxy
rank architectures like full training does?

Two studies, each resumable (finished pieces are kept under ``--work`` and skipped when the command
is run again), each writing a markdown table and a PNG under ``--out``:

    # 1. searchers: `python -m search run` (fpn stage, executor=local) per controller and seed
    PYTHONPATH=. python experiments/search_quality.py searchers --budget 64 --seeds 0 1 2 --jobs 2
    # 2. proxy fidelity: proxy rewards at two proxy budgets vs AP after full training
    PYTHONPATH=. python experiments/search_quality.py fidelity --proxy-iters 30 120 --jobs 2

Both studies use the same proxy task: the search config (``conf/search.yaml``) with the overrides
of ``--search`` (default :data:`PROXY_OVERRIDES`), and one shared feature cache (``--cache-dir``).
Full training is ``python -m detector train`` with the overrides of ``--train`` (default
:data:`TRAIN_OVERRIDES`). The fidelity architectures are the zoo's ``nasfcos``, ``nasfcos-fpn`` and
``fcos`` plus codes picked from the searcher runs at evenly spaced reward ranks (good to bad), or
uniformly sampled codes where no searcher run exists yet.

Statistics: Kendall's tau-b and Spearman's rho (scipy.stats) between proxy reward and trained AP,
with 95% bootstrap confidence intervals over architectures (percentile, 2,000 resamples).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
for entry in (ROOT, ROOT / "experiments"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from controller_study import COLORS, best_so_far  # noqa: E402  (experiments/ helpers)
from search.history import read_history, trained_rows  # noqa: E402

CONTROLLERS = ("ppo", "reinforce", "random", "evolution")
# The proxy task of both studies: the synthetic data of the default training experiment
# (experiment=synthetic_fcos), so that proxy and full training see the same images.
SYNTHETIC_DATA = ("data.num_train=1024", "data.num_val=128", "data.image_min_side=64", "data.image_max_side=128",
                  "data.large_every=0", "data.max_objects=4", "data.min_object_size=16")
PROXY_OVERRIDES = SYNTHETIC_DATA + ("proxy_eval.resolution=128", "proxy_eval.train_images=256",
                                    "proxy_eval.val_images=64", "proxy_eval.adapt_iters=150",
                                    "proxy_eval.iters=30", "proxy_eval.batch_size=4")
TRAIN_OVERRIDES = ("experiment=synthetic_fcos", "schedule.iterations=600", "train.progress=false")
BOOTSTRAP = 2000


# ---------------------------------------------------------------------- processes
def python_module(args: Sequence[str], log: Path) -> int:
    """``python -m <args>`` from the repository root, one torch thread, output appended to ``log``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    with open(log, "a") as out:
        out.write(f"$ python -m {' '.join(shlex.quote(a) for a in args)}\n")
        out.flush()
        return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=out,
                              stderr=subprocess.STDOUT).returncode


def run_parallel(jobs: Sequence[Callable[[], Any]], workers: int) -> list[Any]:
    """Run the callables ``workers`` at a time (each starts its own process) and return their results."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda job: job(), jobs))


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    return read_history(run_dir / "history.jsonl").rows


def mean_std(values: Sequence[float]) -> str:
    """Mean ± standard deviation with 4 decimals (proxy APs are small numbers)."""
    return f"{statistics.mean(values):.4f} ± {statistics.pstdev(values):.4f}"


# ---------------------------------------------------------------------- study 1: searchers
def searcher_run(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One fpn-stage search of ``args.budget`` trials (resumed if an earlier one was cut short)."""
    run_dir = Path(args.work) / "searchers" / f"{name}{args.tag}-seed{seed}"
    rows = read_rows(run_dir)
    if len(trained_rows(rows)) < args.budget:  # the budget counts trained trials, not reused results
        common = [f"cache_dir={args.cache_dir}", "executor=local", "search.workers=1", "device=cpu",
                  "proxy_eval.threads=1"]
        if (run_dir / "config.yaml").exists():
            command = ["search", "run", f"resume={run_dir}", *common]
        else:
            command = ["search", "run", f"controller={name}", *args.controller_set, f"seed={seed}", "search.stages=[fpn]",
                       f"search.budget={args.budget}", f"search.run_dir={run_dir}", f"reward={args.reward}",
                       *common, *args.search]
        started = time.perf_counter()
        code = python_module(command, Path(args.work) / "searchers.log")
        rows = read_rows(run_dir)
        print(f"{name:>10} seed {seed}: exit {code}, {len(rows)} trials, {time.perf_counter() - started:.0f} s",
              flush=True)
    return {"name": name, "seed": seed, "rows": rows}


def trained_rewards(rows: list[dict[str, Any]]) -> list[float]:
    """Rewards of the trials actually trained, in order (failed trials at their floor reward)."""
    return [float(row["reward"]) for row in trained_rows(rows)]


def searchers_study(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    jobs = [lambda n=n, s=s: searcher_run(n, s, args) for n in args.controllers for s in args.seeds]
    runs: dict[str, list[dict[str, Any]]] = {name + args.tag: [] for name in args.controllers}
    for result in run_parallel(jobs, args.jobs):
        runs[result["name"] + args.tag].append(result)
    curves = {name: [trained_rewards(r["rows"]) for r in group] for name, group in runs.items()}
    length = min(len(c) for group in curves.values() for c in group)
    if length == 0:
        print("error: a searcher run has no finished trial; see <work>/searchers.log", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"searchers{args.tag}"
    plot_searchers(curves, length, out / f"{name}.png", args)
    write_searchers_markdown(curves, runs, length, out / f"{name}.md", args, time.perf_counter() - started)
    print((out / f"{name}.md").read_text())
    return 0


def plot_searchers(curves: dict[str, list[list[float]]], length: int, path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = range(1, length + 1)
    for name, group in curves.items():
        columns = list(zip(*(best_so_far(c[:length]) for c in group)))
        mean = [statistics.mean(c) for c in columns]
        color = COLORS.get(name.split("-")[0])
        ax.plot(x, mean, color=color, label=name)
        ax.fill_between(x, [min(c) for c in columns], [max(c) for c in columns], color=color,
                        alpha=0.15, linewidth=0)
    ax.set_xlabel("proxy trials (trained candidates)")
    ax.set_ylabel(f"best-so-far proxy reward ({args.reward})")
    ax.set_title(f"fpn stage, {len(args.seeds)} seeds: mean, band = min..max across seeds")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_searchers_markdown(curves: dict[str, list[list[float]]], runs: dict[str, list[dict[str, Any]]],
                             length: int, path: Path, args: argparse.Namespace, wall: float) -> None:
    random_curves = curves.get("random") or [trained_rewards(read_rows(Path(args.work) / "searchers" / f"random-seed{s}"))
                                             for s in args.seeds]
    random_curves = [c for c in random_curves if len(c) >= length] or [[math.nan]]
    random_final = statistics.mean(max(c[:length]) for c in random_curves)
    lines = ["# Searchers on the real proxy", "", "```", command_line(), "```", "",
             f"fpn stage (head fixed to `head:fcos`), {length} trained candidates per run, controller overrides "
             f"`{' '.join(args.controller_set) or 'none'}`, seeds "
             f"{' '.join(map(str, args.seeds))}, reward `{args.reward}`; proxy overrides: "
             f"`{' '.join(args.search)}`. Trial time summed over all runs "
             f"{sum(float(row.get('seconds') or 0) for g in runs.values() for r in g for row in r['rows']):.0f} s "
             f"(runs {args.jobs} at a time, one torch thread each; this invocation {wall:.0f} s).", "",
             f"![best-so-far](searchers{args.tag}.png)", "",
             "| searcher | final best-so-far | best-so-far at half budget | mean reward, last quarter | "
             "failed trials | seconds per trial |", "|---|---|---|---|---|---|"]
    quarter = max(1, length // 4)
    for name, group in curves.items():
        finals = [max(c[:length]) for c in group]
        halves = [max(c[:length // 2]) for c in group]
        lasts = [statistics.mean(c[length - quarter:length]) for c in group]
        rows = [row for r in runs[name] for row in trained_rows(r["rows"])]
        failed = sum(row["status"] != "ok" for row in rows) / len(group)
        seconds = statistics.mean(float(row.get("seconds") or 0.0) for row in rows)
        lines.append(f"| {name} | {mean_std(finals)} | {mean_std(halves)} | {mean_std(lasts)} | {failed:.1f} | "
                     f"{seconds:.1f} |")
    lines += ["", "Mean ± standard deviation across seeds.", ""]
    if not math.isnan(random_final):
        better = [n for n in curves if n != "random"
                  and statistics.mean(max(c[:length]) for c in curves[n]) > random_final]
        lines.append(f"Random search's mean final best-so-far: {random_final:.4f}. Beat it: {', '.join(better) or 'none'}.")
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------- study 2: fidelity
def pick_architectures(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(label, code): the zoo's three plus codes at evenly spaced reward ranks of the searcher runs
    (or the list of ``--archs-file``)."""
    from detector.arch.zoo import resolve_arch

    if args.archs_file:
        return [(entry["label"], entry["code"]) for entry in json.loads(Path(args.archs_file).read_text())]

    picked = [(name, str(resolve_arch(name))) for name in ("nasfcos", "nasfcos-fpn", "fcos")]
    seen = {code for _, code in picked}
    rows = [row for run in sorted((Path(args.work) / "searchers").glob("*/")) for row in trained_rows(read_rows(run))
            if row["status"] == "ok" and row["code"] not in seen]
    rows.sort(key=lambda row: -float(row["reward"]))
    wanted = args.archs - len(picked)
    if len(rows) >= wanted:
        for rank in [round(i * (len(rows) - 1) / max(1, wanted - 1)) for i in range(wanted)]:
            picked.append((f"searched-rank{rank + 1}of{len(rows)}", rows[rank]["code"]))
        return picked
    from detector.arch.space import SearchSpace

    space, rng = SearchSpace("fpn"), random.Random(0)
    while len(picked) < args.archs:
        code = str(space.sample(rng))
        if code not in seen:
            seen.add(code)
            picked.append((f"random-{len(picked) - 2}", code))
    return picked


def proxy_scores(code: str, iters: int, seeds: Sequence[int], args: argparse.Namespace) -> dict[str, float]:
    """Mean AP and validation loss of the proxy trial at ``iters`` iterations over ``seeds``."""
    import torch

    from detector.cli import compose
    from proxy_eval.build import build_evaluator, prepare_proxy

    torch.set_num_threads(1)
    base = [f"cache_dir={args.cache_dir}", f"device={args.device}", "proxy_eval.threads=1", *args.search]
    cfg = compose("search", [*base, *args.trial_extra,
                             f"proxy_eval.iters={iters}"])  # last: the study's budget wins over --search
    # --trial-extra changes the trials only: the feature cache stays the one --search prepares
    cache = prepare_proxy(compose("search", base)) if args.trial_extra else None
    evaluator = build_evaluator(cfg, cache=cache)
    results = [evaluator.evaluate(code, seed=seed) for seed in seeds]
    if any(not r.ok for r in results):
        return {"ap": 0.0, "loss": math.inf, "status": next(r.status for r in results if not r.ok)}
    return {"ap": statistics.mean(r.ap for r in results), "loss": statistics.mean(r.loss for r in results),
            "seconds": statistics.mean(r.seconds for r in results), "status": "ok"}


def ground_truth_ap(label: str, folder: Path) -> dict[str, Any]:
    """Mean AP over the runs ``<folder>/<label>-s<seed>/metrics.json`` (experiments/fidelity_gpu.sh)."""
    runs = sorted(folder.glob(f"{label}-s*/metrics.json"))
    values = [json.loads(path.read_text()) for path in runs]
    if not values:
        return {"AP": math.nan, "AP50": math.nan}
    return {"AP": statistics.mean(float(v["AP"]) for v in values),
            "AP50": statistics.mean(float(v["AP50"]) for v in values),
            "per_seed": {path.parent.name.rsplit("-s", 1)[1]: float(v["AP"]) for path, v in zip(runs, values)}}


def trained_ap(label: str, code: str, args: argparse.Namespace) -> dict[str, float]:
    """AP of ``python -m detector train`` for the code (kept in <work>/fidelity/train/<label>),
    or, with ``--ground-truth``, the mean AP of the runs found there."""
    if args.ground_truth:
        return ground_truth_ap(label, Path(args.ground_truth))
    out_dir = Path(args.work) / "fidelity" / "train" / label
    metrics = out_dir / "metrics.json"
    if not metrics.exists():
        resume = ["resume=true"] if (out_dir / "last.pt").exists() else []
        python_module(["detector", "train", f"arch={code}", f"out_dir={out_dir}", f"cache_dir={args.cache_dir}",
                       "device=cpu", *resume, *args.train], Path(args.work) / "fidelity.log")
    if not metrics.exists():
        return {"AP": math.nan, "AP50": math.nan}
    data = json.loads(metrics.read_text())
    return {"AP": float(data["AP"]), "AP50": float(data["AP50"]), "seconds": float(data.get("train_seconds", 0))}


def proxy_dir(args: argparse.Namespace) -> Path:
    """Where each architecture's proxy scores are kept (``--proxy-dir``, default <work>/fidelity/proxy)."""
    return Path(args.proxy_dir) if args.proxy_dir else Path(args.work) / "fidelity" / "proxy"


def stored_row(label: str, code: str, args: argparse.Namespace) -> dict[str, Any]:
    """The kept proxy scores of ``label`` ({label, code, proxy: budget -> scores}), or an empty row."""
    store = proxy_dir(args) / f"{label}.json"
    return json.loads(store.read_text()) if store.exists() else {"label": label, "code": code, "proxy": {}}


def fidelity_row(label: str, code: str, args: argparse.Namespace) -> dict[str, Any]:
    store = proxy_dir(args) / f"{label}.json"
    row = stored_row(label, code, args)
    for iters in args.proxy_iters:
        if str(iters) not in row["proxy"]:
            row["proxy"][str(iters)] = proxy_scores(code, iters, args.proxy_seeds, args)
            store.parent.mkdir(parents=True, exist_ok=True)
            store.write_text(json.dumps(row, indent=1))
    if args.proxy_only:
        return row
    row["trained"] = trained_ap(label, code, args)
    print(f"{label:>22}: trained AP {row['trained']['AP']:.4f}; proxy "
          + ", ".join(f"{k} it AP {v['ap']:.4f} loss {v['loss']:.3f}" for k, v in row["proxy"].items()), flush=True)
    return row


def rank_correlations(x: Sequence[float], y: Sequence[float], seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """Kendall's tau-b and Spearman's rho with 95% percentile bootstrap intervals over the pairs."""
    import numpy as np
    from scipy import stats

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    rng = np.random.default_rng(seed)
    out = {}
    for name, fn in (("tau", lambda a, b: stats.kendalltau(a, b).statistic),
                     ("rho", lambda a, b: stats.spearmanr(a, b).statistic)):
        point = float(fn(x, y))
        samples = []
        for _ in range(BOOTSTRAP):
            index = rng.integers(0, len(x), len(x))
            value = fn(x[index], y[index])
            if np.isfinite(value):  # a resample of one repeated pair has no ranking
                samples.append(float(value))
        low, high = (np.percentile(samples, [2.5, 97.5]) if samples else (math.nan, math.nan))
        out[name] = (point, float(low), float(high))
    return out


def paired_tau_difference(x: Sequence[float], x_other: Sequence[float], y: Sequence[float],
                          seed: int = 0) -> tuple[float, float, float]:
    """tau(x, y) - tau(x_other, y) with a 95% percentile bootstrap interval, resampling the
    architectures (the same resample for both proxies: a paired comparison)."""
    import numpy as np
    from scipy import stats

    x, x_other, y = (np.asarray(v, dtype=float) for v in (x, x_other, y))
    rng = np.random.default_rng(seed)

    def difference(index):
        return stats.kendalltau(x[index], y[index]).statistic - stats.kendalltau(x_other[index], y[index]).statistic

    point = float(difference(np.arange(len(x))))
    samples = [v for v in (difference(rng.integers(0, len(x), len(x))) for _ in range(BOOTSTRAP)) if np.isfinite(v)]
    low, high = np.percentile(samples, [2.5, 97.5]) if samples else (math.nan, math.nan)
    return point, float(low), float(high)


def paired_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict:
    """(iters, reward) -> tau difference of ``--proxy-dir`` minus ``--paired-dir`` (same architectures)."""
    other = {row["label"]: json.loads((Path(args.paired_dir) / f"{row['label']}.json").read_text())["proxy"]
             for row in rows}
    trained = [r["trained"]["AP"] for r in rows]
    table = {}
    for iters in args.proxy_iters:
        for reward, key, sign in (("ap", "ap", 1), ("neg_loss", "loss", -1)):
            mine = [sign * r["proxy"][str(iters)][key] for r in rows]
            theirs = [sign * other[r["label"]][str(iters)][key] for r in rows]
            table[(iters, reward)] = paired_tau_difference(mine, theirs, trained)
    return table


def per_folder_scores(labels: Sequence[str], folder: Path, iters: int) -> tuple[list[float], list[float]]:
    """(proxy AP, -loss) of each label at ``iters`` from a ``--proxy-dir`` folder: higher is better in both."""
    proxies = [json.loads((Path(folder) / f"{label}.json").read_text())["proxy"][str(iters)] for label in labels]
    return [float(p["ap"]) for p in proxies], [-float(p["loss"]) for p in proxies]


def combine(per_folder: Sequence[Sequence[float]], by: str) -> list[float]:
    """One score per architecture from several proxy instances (one list per folder, higher is better):
    the mean score (``by="score"``) or the mean rank within each folder (``by="rank"``, ties averaged)."""
    import numpy as np
    from scipy import stats

    values = np.asarray(per_folder, dtype=float)
    if by == "rank":
        values = np.stack([stats.rankdata(v) for v in values])
    return [float(v) for v in values.mean(axis=0)]


def averaged_proxy(labels: Sequence[str], folders: Sequence[str], iters_list: Sequence[int],
                   by: str) -> dict[str, dict[str, dict[str, float]]]:
    """label -> budget -> {"ap", "loss"} combined over ``folders`` (``--average-dirs``); with ``by="rank"``
    "ap" is the mean rank of the proxy AP and "loss" minus the mean rank of -loss, so that both sort as
    the scores do."""
    out: dict[str, dict[str, dict[str, float]]] = {label: {} for label in labels}
    for iters in iters_list:
        scores = [per_folder_scores(labels, Path(folder), iters) for folder in folders]
        ap = combine([s[0] for s in scores], by)
        neg_loss = combine([s[1] for s in scores], by)
        for label, a, n in zip(labels, ap, neg_loss):
            out[label][str(iters)] = {"ap": a, "loss": -n, "status": "ok"}
    return out


def adaptation_lines(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """Markdown: tau of each ``--average-dirs`` folder alone (95% bootstrap CI) and, for K = 1..N, the
    point tau of the combined score over every subset of K folders (mean [min, max] over the subsets)."""
    from itertools import combinations
    from scipy import stats

    labels, trained = [r["label"] for r in rows], [r["trained"]["AP"] for r in rows]
    folders = args.average_dirs
    lines = []
    for iters in args.proxy_iters:
        scores = [per_folder_scores(labels, Path(folder), iters) for folder in folders]
        lines += ["", f"Each proxy instance alone, {iters} iterations:", "",
                  "| folder | tau, ap [95% CI] | tau, neg_loss [95% CI] |", "|---|---|---|"]
        for folder, (ap, neg_loss) in zip(folders, scores):
            a, n = (rank_correlations(v, trained)["tau"] for v in (ap, neg_loss))
            lines.append(f"| `{folder}` | {a[0]:.2f} [{a[1]:.2f}, {a[2]:.2f}] | {n[0]:.2f} [{n[1]:.2f}, {n[2]:.2f}] |")
        agreement = [statistics.mean(stats.kendalltau(scores[i][reward], scores[j][reward]).statistic
                                     for i, j in combinations(range(len(folders)), 2)) if len(folders) > 1 else math.nan
                     for reward in (0, 1)]
        lines += ["", f"Agreement of the instances with each other (mean Kendall tau over the pairs of folders): "
                  f"ap {agreement[0]:.2f}, neg_loss {agreement[1]:.2f}."]
        lines += ["", f"Combined over K of the {len(folders)} instances, {iters} iterations: point tau, mean [min, max] "
                  "over every subset of K folders:", "",
                  "| K | subsets | ap, mean score | ap, mean rank | neg_loss, mean score | neg_loss, mean rank |",
                  "|---|---|---|---|---|---|"]
        for k in range(1, len(folders) + 1):
            subsets = list(combinations(range(len(folders)), k))
            cells = []
            for reward in (0, 1):
                for by in ("score", "rank"):
                    taus = [stats.kendalltau(combine([scores[i][reward] for i in subset], by), trained).statistic
                            for subset in subsets]
                    cells.append(f"{statistics.mean(taus):.2f} [{min(taus):.2f}, {max(taus):.2f}]")
            lines.append(f"| {k} | {len(subsets)} | " + " | ".join(cells) + " |")
    return lines


def fidelity_study(args: argparse.Namespace) -> int:
    from proxy_eval.build import prepare_proxy
    from detector.cli import compose

    started = time.perf_counter()
    archs = pick_architectures(args)
    if args.average_dirs:  # scores kept in several folders (proxy instances), combined; nothing is computed
        combined = averaged_proxy([label for label, _ in archs], args.average_dirs, args.proxy_iters, args.average_by)
        rows = [{"label": label, "code": code, "proxy": combined[label], "trained": trained_ap(label, code, args)}
                for label, code in archs]
        return fidelity_report(rows, args, started)
    missing = [label for label, code in archs
               if not all(str(i) in stored_row(label, code, args)["proxy"] for i in args.proxy_iters)]
    if missing:  # the feature cache (or the end-to-end proxy's data), once, before the jobs
        prepare_proxy(compose("search", [f"cache_dir={args.cache_dir}", f"device={args.device}", *args.search]))
    if args.device == "cpu":
        rows = run_parallel([lambda a=a: fidelity_row(*a, args) for a in archs], args.jobs)
    else:  # one process per job: launch-bound GPU work does not share a Python interpreter well
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(fidelity_row, *zip(*archs), [args] * len(archs)))
    if args.proxy_only:  # the list experiments/fidelity_gpu.sh trains
        Path(args.out).mkdir(parents=True, exist_ok=True)
        listing = Path(args.out) / "fidelity_archs.json"
        listing.write_text(json.dumps([{"label": label, "code": code} for label, code in archs], indent=1) + "\n")
        print(f"proxy scores of {len(rows)} architectures in {proxy_dir(args)}; list: {listing}")
        return 0
    return fidelity_report(rows, args, started)


def fidelity_report(rows: list[dict[str, Any]], args: argparse.Namespace, started: float) -> int:
    rows = [r for r in rows if math.isfinite(r["trained"]["AP"])]
    if len(rows) < 3:
        print("error: fewer than 3 architectures finished training; see <work>/fidelity.log", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = {}
    for iters in args.proxy_iters:
        for reward in ("ap", "neg_loss"):
            proxy = [r["proxy"][str(iters)]["ap"] if reward == "ap" else -r["proxy"][str(iters)]["loss"] for r in rows]
            table[(iters, reward)] = rank_correlations(proxy, [r["trained"]["AP"] for r in rows])
    plot_fidelity(rows, args, out / f"{args.name}.png")
    paired = paired_table(rows, args) if args.paired_dir else {}
    extra = adaptation_lines(rows, args) if args.average_dirs else []
    write_fidelity_markdown(rows, table, args, out / f"{args.name}.md", time.perf_counter() - started, paired, extra)
    print((out / f"{args.name}.md").read_text())
    return 0


def plot_fidelity(rows: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(args.proxy_iters), 2, figsize=(10, 4 * len(args.proxy_iters)), squeeze=False)
    trained = [r["trained"]["AP"] for r in rows]
    for i, iters in enumerate(args.proxy_iters):
        for j, (reward, key, sign) in enumerate((("ap", "ap", 1), ("neg_loss (-loss)", "loss", -1))):
            ax = axes[i][j]
            proxy = [sign * r["proxy"][str(iters)][key] for r in rows]
            ax.scatter(proxy, trained)
            for r, px, ty in zip(rows, proxy, trained):
                ax.annotate(r["label"], (px, ty), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel(f"proxy {reward}, {iters} iterations")
            ax.set_ylabel("AP after full training")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_fidelity_markdown(rows: list[dict[str, Any]], table: dict, args: argparse.Namespace, path: Path,
                            wall: float, paired: dict | None = None, extra: Sequence[str] = ()) -> None:
    budgets = args.proxy_iters
    training = (f"`python -m detector train {' '.join(args.train)}`" if not args.ground_truth else
                f"the runs of experiments/fidelity_gpu.sh in `{args.ground_truth}` (mean over their seeds)")
    lines = ["# Proxy fidelity: proxy reward vs AP after full training", "", "```", command_line(), "```", "",
             f"{len(rows)} architectures; proxy: search config with `{' '.join(args.search)}`"
             + (f", trials with `{' '.join(args.trial_extra)}`" if args.trial_extra else "") + ", "
             f"mean over proxy seeds {' '.join(map(str, args.proxy_seeds))}; full training: "
             f"{training}. Wall time of this invocation {wall:.0f} s.", "",
             *([f"Proxy scores: the mean {args.average_by} over the {len(args.average_dirs)} folders "
                + ", ".join(f"`{d}`" for d in args.average_dirs) + " (one proxy instance each; the config above "
                "is not used)" + (": the columns \"AP\" and \"loss\" below hold the mean rank of AP (higher is "
                "better) and minus the mean rank of -loss" if args.average_by == "rank" else "") + ".", ""]
               if getattr(args, "average_dirs", None) else []),
             f"![fidelity]({args.name}.png)", "",
             "| proxy budget (iterations) | reward | Kendall tau [95% CI] | Spearman rho [95% CI] |",
             "|---|---|---|---|"]
    for (iters, reward), stats_ in table.items():
        tau, rho = stats_["tau"], stats_["rho"]
        lines.append(f"| {iters} | {reward} | {tau[0]:.2f} [{tau[1]:.2f}, {tau[2]:.2f}] | "
                     f"{rho[0]:.2f} [{rho[1]:.2f}, {rho[2]:.2f}] |")
    if paired:
        lines += ["", f"Paired with the proxy scores in `{args.paired_dir}` (same architectures, same bootstrap "
                  "resamples for both):", "",
                  "| proxy budget (iterations) | reward | tau here minus tau there [95% CI] |", "|---|---|---|"]
        lines += [f"| {iters} | {reward} | {d[0]:+.2f} [{d[1]:.2f}, {d[2]:.2f}] |"
                  for (iters, reward), d in paired.items()]
    lines += list(extra)
    header = " | ".join(f"proxy AP / loss @{i}" for i in budgets)
    lines += ["", f"| architecture | trained AP | trained AP50 | {header} | code |",
              "|---|---|---|" + "---|" * len(budgets) + "---|"]
    for r in sorted(rows, key=lambda r: -r["trained"]["AP"]):
        cells = " | ".join(f"{r['proxy'][str(i)]['ap']:.4f} / {r['proxy'][str(i)]['loss']:.3f}" for i in budgets)
        lines.append(f"| {r['label']} | {r['trained']['AP']:.4f} | {r['trained']['AP50']:.4f} | {cells} | "
                     f"`{r['code']}` |")
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------- command line
def short_training_taus(labels: Sequence[str], final_dir: Path, along_dir: Path,
                        final_seeds: Sequence[str] | None = None) -> dict[int, dict]:
    """Kendall/Spearman (with bootstrap CIs) of AP after k iterations of full training -- the
    ``evals`` of the runs in ``along_dir`` (another seed, trained with ``train.eval_every``) --
    against the final AP of the runs in ``final_dir`` (only ``final_seeds`` if given: keep the two
    sets of runs independent), for every k evaluated in all runs."""
    final = []
    for label in labels:
        per_seed = ground_truth_ap(label, final_dir).get("per_seed", {})
        kept = [ap for seed, ap in per_seed.items() if final_seeds is None or seed in final_seeds]
        if not kept:
            raise FileNotFoundError(f"no final run of {label} (seeds {final_seeds or 'any'}) under {final_dir}")
        final.append(statistics.mean(kept))
    along = []
    for label in labels:
        runs = sorted(along_dir.glob(f"{label}-s*/metrics.json"))
        if not runs:
            raise FileNotFoundError(f"no {label}-s*/metrics.json under {along_dir}")
        evals = [{int(e["iteration"]): float(e["AP"]) for e in json.loads(p.read_text())["evals"]} for p in runs]
        along.append({k: statistics.mean(e[k] for e in evals) for k in set.intersection(*(set(e) for e in evals))})
    iterations = sorted(set.intersection(*(set(a) for a in along)))
    return {k: rank_correlations([a[k] for a in along], final) for k in iterations}


def short_training_study(args: argparse.Namespace) -> int:
    """Would a short *full* training rank like the full one? (evidence for the proxy's design)"""
    if not (args.ground_truth and args.along):
        print("error: short-training needs --ground-truth (final APs) and --along (runs with evals)", file=sys.stderr)
        return 2
    labels = [label for label, _ in pick_architectures(args)]
    taus = short_training_taus(labels, Path(args.ground_truth), Path(args.along), args.final_seeds)
    lines = [f"# Short full training as a proxy ({len(labels)} architectures)", "",
             f"AP after k iterations of `python -m detector train` (runs in `{args.along}`) against the final AP "
             f"of independent runs (`{args.ground_truth}`, seeds {args.final_seeds or 'all'}). "
             f"Command: `{command_line()}`", "",
             "| iterations | Kendall tau [95% CI] | Spearman rho [95% CI] |", "|---|---|---|"]
    for k, corr in taus.items():
        tau, rho = corr["tau"], corr["rho"]
        lines.append(f"| {k} | {tau[0]:.2f} [{tau[1]:.2f}, {tau[2]:.2f}] | {rho[0]:.2f} [{rho[1]:.2f}, {rho[2]:.2f}] |")
    out = Path(args.out) / f"{args.name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())
    return 0


def command_line() -> str:
    return "PYTHONPATH=. python experiments/search_quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", choices=("searchers", "fidelity", "short-training"))
    parser.add_argument("--work", default=str(ROOT / "runs" / "search_quality"),
                        help="where runs, trainings and partial results are kept (resumable)")
    parser.add_argument("--out", default=str(ROOT / "experiments" / "search_quality"), help="tables and plots")
    parser.add_argument("--cache-dir", default=None, help="feature cache shared by every run (default <work>/cache)")
    parser.add_argument("--jobs", type=int, default=2, help="processes at a time (one torch thread each)")
    parser.add_argument("--search", nargs="*", default=list(PROXY_OVERRIDES), help="overrides of the proxy task")
    parser.add_argument("--search-extra", nargs="*", default=[], help="overrides appended to --search")
    parser.add_argument("--trial-extra", nargs="*", default=[],
                        help="fidelity: overrides of the trials only, on the cache that --search prepares (e.g. "
                             "proxy_eval.train_last_stage=false on a cache prepared with it: same features)")
    parser.add_argument("--reward", default="ap", choices=("ap", "neg_loss"), help="searchers: the reward searched")
    parser.add_argument("--controllers", nargs="+", default=list(CONTROLLERS), choices=CONTROLLERS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--controller-set", nargs="*", default=[], help="searchers: e.g. controller.lr=0.01")
    parser.add_argument("--tag", default="", help="searchers: suffix of the run names and outputs, e.g. -lr1e-2")
    parser.add_argument("--budget", type=int, default=64, help="searchers: trained candidates per run")
    parser.add_argument("--archs", type=int, default=8, help="fidelity: architectures (3 from the zoo + the rest)")
    parser.add_argument("--proxy-iters", nargs="+", type=int, default=[30, 120])
    parser.add_argument("--proxy-seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--train", nargs="*", default=list(TRAIN_OVERRIDES), help="overrides of full training")
    parser.add_argument("--proxy-only", action="store_true",
                        help="fidelity: proxy scores only, and write <out>/fidelity_archs.json for fidelity_gpu.sh")
    parser.add_argument("--ground-truth", default=None,
                        help="fidelity: folder of <label>-s<seed>/metrics.json from experiments/fidelity_gpu.sh "
                             "instead of training on the CPU")
    parser.add_argument("--name", default="fidelity", help="fidelity: output name (<out>/<name>.md, .png)")
    parser.add_argument("--archs-file", default=None, help="fidelity: JSON list of {label, code} to score")
    parser.add_argument("--proxy-dir", default=None, help="fidelity: folder of <label>.json proxy scores "
                        "(default <work>/fidelity/proxy); missing budgets are computed and added")
    parser.add_argument("--paired-dir", default=None,
                        help="fidelity: another --proxy-dir to compare with: tau difference, paired bootstrap CI")
    parser.add_argument("--device", default="cpu", help="fidelity: device of the proxy (cpu | cuda)")
    parser.add_argument("--along", default=None,
                        help="short-training: folder of <label>-s<seed>/metrics.json runs with evals along the way")
    parser.add_argument("--final-seeds", nargs="+", default=None,
                        help="short-training: seeds of the --ground-truth runs to use (default: all)")
    parser.add_argument("--average-dirs", nargs="+", default=None,
                        help="fidelity: several --proxy-dir folders (e.g. one per proxy_eval.split_seed, each its own "
                             "adaptation) whose scores are combined (--average-by) and ranked; nothing is computed; "
                             "adds tau of each alone and of every subset of K of them")
    parser.add_argument("--average-by", default="score", choices=("score", "rank"),
                        help="fidelity, --average-dirs: mean of the scores or mean of the per-folder ranks")
    args = parser.parse_args(argv)
    if args.budget < 4 or args.archs < 3 or args.jobs < 1:
        print("error: --budget must be >= 4, --archs >= 3 and --jobs >= 1", file=sys.stderr)
        return 2
    args.cache_dir = args.cache_dir or str(Path(args.work) / "cache")
    args.search = [*args.search, *args.search_extra]
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.study == "short-training":
        return short_training_study(args)
    return searchers_study(args) if args.study == "searchers" else fidelity_study(args)


if __name__ == "__main__":
    sys.exit(main())
