"""Search-quality study 1: do the searchers beat random search on real proxy trials?

One fpn-stage `python -m search run` (executor=local) per controller and seed, resumable:

    PYTHONPATH=. python experiments/study_searchers.py --budget 64 --seeds 0 1 2 --jobs 2

Writes <out>/searchers<tag>.md (mean +- std of the final best-so-far, per controller) and .png
(best-so-far against trained trials)."""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence


ROOT = Path(__file__).resolve().parents[1]
for entry in (ROOT, ROOT / "experiments"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from controller_study import COLORS, best_so_far  # noqa: E402  (experiments/ helpers)
from search.history import trained_rows  # noqa: E402
from study_common import command_line, mean_std, parse_study_args, python_module, read_rows, run_parallel  # noqa: E402


def searcher_run(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One fpn-stage search of ``args.budget`` trials (resumed if an earlier one was cut short or had
    a smaller budget: the resume raises it, and the search goes on where it stopped)."""
    run_dir = Path(args.work) / "searchers" / f"{name}{args.tag}-seed{seed}"
    rows = read_rows(run_dir)
    if len(trained_rows(rows)) < args.budget:  # the budget counts trained trials, not reused results
        common = [f"cache_dir={args.cache_dir}", "executor=local", "search.workers=1", "device=cpu",
                  "proxy_eval.threads=1"]
        if (run_dir / "config.yaml").exists():
            command = ["search", "run", f"resume={run_dir}", f"search.budget={args.budget}", *common]  # raise: continues
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


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean (sample standard deviation / sqrt(n)); 0 for a single value."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def margin_over(finals: Sequence[float], baseline: Sequence[float]) -> tuple[float, float]:
    """(mean(finals) - mean(baseline), standard error of that difference) for independent seeds."""
    return (statistics.mean(finals) - statistics.mean(baseline),
            math.sqrt(standard_error(finals) ** 2 + standard_error(baseline) ** 2))


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
        error = [standard_error(c) for c in columns]
        color = COLORS.get(name.split("-")[0])
        ax.plot(x, mean, color=color, label=name)
        ax.fill_between(x, [m - e for m, e in zip(mean, error)], [m + e for m, e in zip(mean, error)], color=color,
                        alpha=0.15, linewidth=0)
    ax.set_xlabel("proxy trials (trained candidates)")
    ax.set_ylabel(f"best-so-far proxy reward ({args.reward})")
    ax.set_title(f"fpn stage, {len(args.seeds)} seeds: mean, band = ± standard error across seeds")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_searchers_markdown(curves: dict[str, list[list[float]]], runs: dict[str, list[dict[str, Any]]],
                             length: int, path: Path, args: argparse.Namespace, wall: float) -> None:
    random_name = "random" + args.tag
    random_curves = curves.get(random_name) or [
        trained_rewards(read_rows(Path(args.work) / "searchers" / f"{random_name}-seed{s}")) for s in args.seeds]
    random_finals = [max(c[:length]) for c in random_curves if len(c) >= length] or [math.nan]
    random_final = statistics.mean(random_finals)
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
        lines += [f"Random search's mean final best-so-far: {random_final:.4f}. Margin of each searcher over it "
                  "(difference of the mean final best-so-far, ± the standard error of that difference):", "",
                  "| searcher | final best-so-far, mean ± SE | margin over random ± SE | beats random by more than its SE |",
                  "|---|---|---|---|"]
        for name in curves:
            if name == random_name:
                continue
            finals = [max(c[:length]) for c in curves[name]]
            margin, error = margin_over(finals, random_finals)
            lines.append(f"| {name} | {statistics.mean(finals):.4f} ± {standard_error(finals):.4f} | "
                         f"{margin:+.4f} ± {error:.4f} | {'yes' if margin > error else 'no'} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_study_args("searchers", __doc__.splitlines()[0], argv)
    return 2 if args is None else searchers_study(args)


if __name__ == "__main__":
    sys.exit(main())
