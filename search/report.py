"""``python -m search report run=<run_dir>``: report.md and plots of a search run.

Written into the run directory (``run`` itself finishes by calling :func:`write_report`):

- ``report.md``: the setup, counts per stage, the top-k table of distinct codes (code, stage,
  reward, AP, AP50, params, GFLOPs, seconds), failures, the best code and the retrain command;
- ``reward_per_trial.png``: the reward of every history line by trial index, coloured by stage
  (failed trials as red crosses at the floor reward, reused results as small grey rings);
- ``best_so_far.png``: per stage, the best reward after each trained trial;
- ``best_arch.png``: the diagram of the best architecture (:func:`search.diagram.draw_arch`);
- when trials measured latency (``search.objective``): the AP-latency front table and
  ``pareto_front.png`` (:mod:`search.pareto`).

Works on a run still in progress (it reads ``history.jsonl`` without changing it) and prints the
retrain command ``python -m detector train arch=<run_dir>``, which reads ``best.txt``.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from search.early_stopping import stopped_lines
from search.history import HISTORY_FILE, best_row, read_history, trained_rows
from search.pareto import front_section
from search.run_dir import CONFIG_FILE, check_run_dir

REPORT_FILE = "report.md"
REWARD_PLOT = "reward_per_trial.png"
BEST_PLOT = "best_so_far.png"
ARCH_PLOT = "best_arch.png"
_STAGE_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")


def retrain_command(run_dir: Path) -> str:
    return f"python -m detector train arch={run_dir}"


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _params(value: Any) -> str:
    if not value:
        return "-"
    return f"{value / 1e6:.2f}M" if value >= 1e5 else f"{value / 1e3:.1f}K"


def _config_lines(run_dir: Path) -> list[str]:
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(run_dir / CONFIG_FILE)
    except Exception as err:  # noqa: BLE001 - a report should still come out
        return [f"- config.yaml unreadable ({type(err).__name__})"]

    def get(key: str) -> Any:
        return OmegaConf.select(cfg, key, default="-")

    stages = get("search.stages")
    stages = "[" + ", ".join(stages) + "]" if isinstance(stages, (list, tuple)) or OmegaConf.is_list(stages) else stages
    return [
        f"- stages {stages}, budget {get('search.budget')} trained trials per stage, "
        f"{get('search.workers')} worker(s), executor `{get('executor.name')}`",
        f"- controller `{get('controller.name')}`, proxy `{get('proxy_eval.name')}`, reward `{get('reward')}`, "
        f"objective `{get('search.objective')}`, "
        f"backbone `{get('backbone.name')}`, data `{get('data.name')}`, seed {get('seed')}",
    ]


def _latency_target(run_dir: Path) -> float | None:
    """``search.latency.target_ms`` of an ``ap_at_latency`` run (the front's reference line), else None."""
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(run_dir / CONFIG_FILE)
    except Exception:  # noqa: BLE001 - a report should still come out
        return None
    if OmegaConf.select(cfg, "search.objective", default="ap") != "ap_at_latency":
        return None
    return float(OmegaConf.select(cfg, "search.latency.target_ms", default=100.0))


def _top_rows(rows: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    ok = [r for r in trained_rows(rows) if r["status"] == "ok"]
    return sorted(ok, key=lambda r: (-r["reward"], r["trial"]))[:k]


def _stage_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| # | stage | trained | reused | failed | best reward | best code |", "|---|---|---|---|---|---|---|"]
    for index in sorted({r["stage_index"] for r in rows}):
        stage_rows = [r for r in rows if r["stage_index"] == index]
        trained = trained_rows(stage_rows)
        best = best_row(stage_rows)
        lines.append(
            f"| {index} | {stage_rows[0]['stage']} | {len(trained)} | {len(stage_rows) - len(trained)} | "
            f"{sum(_failed(r) for r in trained)} | {_fmt(best['reward'] if best else None)} | "
            f"{'`' + best['code'] + '`' if best else '-'} |"
        )
    return lines


def _failed(row: dict[str, Any]) -> bool:
    """A trial that failed (a stopped one did not: it was cut short on purpose)."""
    return row["status"] not in ("ok", "stopped")


def _failure_lines(rows: list[dict[str, Any]], limit: int = 10) -> list[str]:
    failed = [r for r in trained_rows(rows) if _failed(r)]
    if not failed:
        return ["No trial failed."]
    counts = Counter(r["status"] for r in failed)
    summary = ", ".join(f"{n} {status}" for status, n in counts.most_common())
    lines = [f"{summary} (recorded with the floor reward):", ""]
    for r in failed[:limit]:
        lines.append(f"- trial {r['trial']} ({r['status']}, {r.get('attempts', 1)} attempt(s)): "
                     f"{(r.get('error') or '').splitlines()[0][:160] if r.get('error') else '-'}")
    if len(failed) > limit:
        lines.append(f"- ... and {len(failed) - limit} more (see {HISTORY_FILE})")
    return lines


def _plot_rewards(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    stages = sorted({(r["stage_index"], r["stage"]) for r in rows})
    for index, name in stages:
        color = _STAGE_COLORS[index % len(_STAGE_COLORS)]
        own = [r for r in rows if r["stage_index"] == index]
        ok = [r for r in own if r["status"] == "ok" and not r["reused"]]
        ax.scatter([r["trial"] for r in ok], [r["reward"] for r in ok], s=18, color=color, label=f"{index}: {name}")
        reused = [r for r in own if r["reused"]]
        if reused:
            ax.scatter([r["trial"] for r in reused], [r["reward"] for r in reused], s=14, facecolors="none",
                       edgecolors="grey", linewidths=0.6)
        if index > 0 and own:
            ax.axvline(min(r["trial"] for r in own) - 0.5, color="grey", lw=0.6, ls=":")
    failed = [r for r in rows if _failed(r) and not r["reused"]]
    if failed:
        ax.scatter([r["trial"] for r in failed], [r["reward"] for r in failed], marker="x", color="red",
                   s=24, label="failed")
    stopped = [r for r in rows if r["status"] == "stopped" and not r["reused"]]
    if stopped:
        ax.scatter([r["trial"] for r in stopped], [r["reward"] for r in stopped], marker="v", color="black",
                   s=16, label="stopped early (reward told)")
    ax.set_xlabel("trial (finishing order)")
    ax.set_ylabel("reward")
    ax.set_title("Reward per trial (rings: reused results)")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_best_so_far(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for index, name in sorted({(r["stage_index"], r["stage"]) for r in rows}):
        best, xs, ys = -math.inf, [], []
        for n, r in enumerate(trained_rows(r for r in rows if r["stage_index"] == index), start=1):
            best = max(best, r["reward"])
            xs.append(n)
            ys.append(best)
        ax.step(xs, ys, where="post", marker="o", ms=3, color=_STAGE_COLORS[index % len(_STAGE_COLORS)],
                label=f"{index}: {name}")
    ax.set_xlabel("trained trials in the stage")
    ax.set_ylabel("best reward so far")
    ax.set_title("Best reward so far, per stage")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(run_dir: str | Path, top_k: int = 5) -> Path:
    """Write report.md and the PNGs into ``run_dir``; print the retrain command. Returns report.md."""
    from detector.arch.grammar import parse
    from search.diagram import draw_arch

    run_dir = Path(run_dir)
    found = read_history(run_dir / HISTORY_FILE)
    rows = found.rows
    best = best_row(rows)
    trained = trained_rows(rows)
    lines = [f"# Search report: `{run_dir}`", "", *_config_lines(run_dir), ""]
    if found.dropped_tail is not None:
        lines += ["The last line of history.jsonl was truncated (driver killed while writing) and is ignored.", ""]
    if not rows:
        lines += ["No trial has finished yet.", ""]
    else:
        seconds = sum(r.get("seconds") or 0.0 for r in trained)
        lines += [f"{len(rows)} trials in history: {len(trained)} trained "
                  f"({sum(_failed(r) for r in trained)} failed), {len(rows) - len(trained)} reused "
                  f"(codes already evaluated, not trained again); {seconds:.0f} s of trial time.", "",
                  "## Stages", "", *_stage_lines(rows), "",
                  f"## Top {top_k}", "",
                  "| rank | code | stage | reward | AP | AP50 | params | GFLOPs | seconds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for rank, r in enumerate(_top_rows(rows, top_k), start=1):
            lines.append(f"| {rank} | `{r['code']}` | {r['stage']} | {_fmt(r['reward'])} | {_fmt(r.get('ap'))} | "
                         f"{_fmt(r.get('ap50'))} | {_params(r.get('params'))} | {_fmt(r.get('gflops'), 2)} | "
                         f"{_fmt(r.get('seconds'), 1)} |")
        lines += ["", "## Failures", "", *_failure_lines(rows), "", *stopped_lines(rows),
                  "## Plots", "", f"![reward per trial]({REWARD_PLOT})", "", f"![best so far]({BEST_PLOT})", ""]
        _plot_rewards(rows, run_dir / REWARD_PLOT)
        _plot_best_so_far(rows, run_dir / BEST_PLOT)
        lines += front_section(rows, run_dir, _latency_target(run_dir))
    lines += ["## Best architecture", ""]
    if best is None:
        lines += ["No trial finished with status ok, so there is no best code (and no best.txt).", ""]
    else:
        draw_arch(parse(best["code"], None, None), run_dir / ARCH_PLOT, title=f"best: reward {best['reward']:.4f}")
        lines += [f"`{best['code']}`", "",
                  f"reward {_fmt(best['reward'])}, AP {_fmt(best.get('ap'))}, params {_params(best.get('params'))}, "
                  f"GFLOPs {_fmt(best.get('gflops'), 2)} (trial {best['trial']}, stage {best['stage']})", "",
                  f"![best architecture]({ARCH_PLOT})", "",
                  "Retrain it as a full detector:", "", "```", retrain_command(run_dir), "```", ""]
    path = run_dir / REPORT_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    print(f"report: {path}")
    if best is not None:
        print(f"retrain the best architecture: {retrain_command(run_dir)}")
    return path


def report_command(cfg: Any) -> None:
    """``python -m search report run=<run_dir>``."""
    run_dir = check_run_dir(cfg.get("run"), key="run")
    top_k = int(cfg.search.get("top_k", 5))
    write_report(run_dir, top_k=top_k)
