"""Validation AP along training for the GPU runs of the default experiment (issue #19's GPU form).

Reads ``<folder>/<run>/log.jsonl`` (``val/AP`` at every ``train.eval_every`` step, also of a run that
a call's time limit cut) and ``<run>/metrics.json`` when the run finished, for every run folder whose
name matches ``--match`` (a glob), and writes ``<out>/<name>.md`` (a table: last evaluated step, AP
there, best AP, final AP of finished runs) and ``<out>/<name>.png`` (AP against iterations, one line
per run).

    PYTHONPATH=. python experiments/gpu_form_curves.py --runs experiments/search_quality/pretrained/gpu_form_sweep \\
        --match 's9-*' --out experiments/search_quality/pretrained --name gpu-form-session9
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for entry in (ROOT, ROOT / "experiments"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from study_common import command_line  # noqa: E402


def read_curve(run: Path) -> list[tuple[int, float]]:
    """[(step, val AP), ...] of a run's log.jsonl, in step order."""
    curve = []
    for line in (run / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "val/AP" in record:
            curve.append((int(record["step"]), float(record["val/AP"])))
    return sorted(curve)


def summarize(run: Path) -> dict[str, Any] | None:
    """The table row of one run folder; None when it has no evaluation."""
    curve = read_curve(run) if (run / "log.jsonl").is_file() else []
    if not curve:
        return None
    metrics = run / "metrics.json"
    final = json.loads(metrics.read_text())["AP"] if metrics.is_file() else None
    return {"run": run.name, "curve": curve, "last_step": curve[-1][0], "last_ap": curve[-1][1],
            "best_ap": max(ap for _, ap in curve), "final_ap": final}


def write_outputs(rows: list[dict[str, Any]], out: Path, name: str) -> Path:
    lines = [f"# {name}", "", f"Command: `{command_line()}`", "",
             "AP on the synthetic val split at each evaluation; a run without a final AP was cut by its "
             "call's time limit (its last evaluated step is not the end of its schedule).", "",
             "| run | last evaluated step | AP there | best AP | final AP |", "|---|---|---|---|---|"]
    for row in rows:
        final = "cut" if row["final_ap"] is None else f"{row['final_ap']:.4f}"
        lines.append(f"| {row['run']} | {row['last_step']} | {row['last_ap']:.4f} | {row['best_ap']:.4f} | {final} |")
    table = out / f"{name}.md"
    table.write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for row in rows:
        steps, aps = zip(*row["curve"])
        ax.plot(steps, aps, marker="o", markersize=3, label=row["run"] + ("" if row["final_ap"] is not None else " (cut)"))
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("training iteration (batch 16)")
    ax.set_ylabel("val AP")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=120)
    plt.close(fig)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="folders holding <run>/log.jsonl")
    parser.add_argument("--match", default="*", help="glob of the run folders' names")
    parser.add_argument("--out", required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args(argv)
    runs = sorted(run for folder in args.runs for run in Path(folder).glob(args.match) if run.is_dir())
    rows = [row for row in map(summarize, runs) if row is not None]
    if not rows:
        print(f"error: no run folder matching {args.match!r} with a log.jsonl under {' '.join(args.runs)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(write_outputs(rows, out, args.name).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
