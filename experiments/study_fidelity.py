"""Search-quality study 2: does the proxy rank architectures like full training does?

Proxy rewards at several proxy budgets (and seeds) against AP after full training, resumable:

    PYTHONPATH=. python experiments/study_fidelity.py --proxy-iters 30 120 --jobs 2

The architectures are the zoo's nasfcos, nasfcos-fpn and fcos plus codes picked from the searcher
runs at evenly spaced reward ranks (or uniformly sampled codes where none exist), or --archs-file.
Ground truth: `python -m detector train` with --train, or --ground-truth folders from
experiments/fidelity_gpu.sh. Writes <out>/<name>.md (tau and rho with bootstrap intervals) and .png."""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence


ROOT = Path(__file__).resolve().parents[1]
for entry in (ROOT, ROOT / "experiments"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from search.history import trained_rows  # noqa: E402
from study_common import command_line, parse_study_args, python_module, read_rows, run_parallel  # noqa: E402
from study_stats import combine, paired_tau_difference, rank_correlations  # noqa: E402


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
    curves: list[list[list[float]]] = []  # per seed: the training loss at every report
    window_curves: list[list[list[float]]] = []  # per seed: the mean loss since the previous report

    def record(values: dict) -> None:
        curves[-1].append([values["iteration"], values["loss"]])
        if "loss_window" in values:  # the trained proxies report it, the toy proxy does not
            window_curves[-1].append([values["iteration"], values["loss_window"]])

    def evaluate(seed: int):
        curves.append([])
        window_curves.append([])
        return evaluator.evaluate(code, seed=seed, report=record)

    results = [evaluate(seed) for seed in seeds]
    if any(not r.ok for r in results):
        return {"ap": 0.0, "loss": math.inf, "status": next(r.status for r in results if not r.ok)}
    return {"ap": statistics.mean(r.ap for r in results), "loss": statistics.mean(r.loss for r in results),
            "seconds": statistics.mean(r.seconds for r in results), "status": "ok",
            # per seed: [[iteration, training loss], ...] and [[iteration, mean loss since the previous
            # report], ...] (experiments/replay_early_stopping.py --metric)
            "curves": curves, "window_curves": window_curves}


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
    if args.proxy_only:
        if args.archs_file:  # the list came from a file: nothing to write (and nothing overwritten)
            print(f"proxy scores of {len(rows)} architectures in {proxy_dir(args)}")
            return 0
        Path(args.out).mkdir(parents=True, exist_ok=True)  # the list experiments/fidelity_gpu.sh trains
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


def main(argv: list[str] | None = None) -> int:
    args = parse_study_args("fidelity", __doc__.splitlines()[0], argv)
    return 2 if args is None else fidelity_study(args)


if __name__ == "__main__":
    sys.exit(main())
