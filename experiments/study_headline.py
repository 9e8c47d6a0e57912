"""Search-quality study 3, the headline: searched decoders retrained against the hand-made ones.

Every entry of ``--list`` (one or several files, joined; ``{"label", "code", "from"?}``; an entry with ``from`` is a searched
code, the others are baselines) is looked up as ``<label>-s<seed>/metrics.json`` in each
``--ground-truth`` folder (all seeds found are used), and reported as AP mean +- sample standard
deviation over its seeds, AP50, parameters and GFLOPs of the decoder (FPN + head; the default
experiment's backbone, classes and width, at ``--input-size``, the NAS-FCOS paper's 800 x 1333 by
default) and the training speed in images per second (``iterations x batch / train_seconds`` of
each run; runs that shared a GPU compare only with runs of the same call).

The goal check: a searched code beats ``--reference`` (``fcos``) when its mean AP is above the
reference's by more than 2 standard deviations, the larger of the two codes' seed deviations, at no
more than ``--max-gflops-ratio`` (1.5) times the reference's decoder GFLOPs.

    PYTHONPATH=. python experiments/study_headline.py --list experiments/search_quality/pretrained/headline.json \\
        --ground-truth experiments/search_quality/pretrained/gpu_ground_truth experiments/search_quality/pretrained/gpu_headline \\
        --out experiments/search_quality/pretrained --name headline

Writes ``<out>/<name>.md`` (table and verdicts) and ``<out>/<name>.png`` (AP +- std against decoder GFLOPs).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
for entry in (ROOT, ROOT / "experiments"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from study_common import command_line  # noqa: E402


def seed_metrics(label: str, folders: Sequence[Path]) -> dict[int, dict[str, Any]]:
    """{seed: metrics.json} of every ``<folder>/<label>-s<seed>/metrics.json`` (a later folder wins)."""
    found: dict[int, dict[str, Any]] = {}
    for folder in folders:
        for path in sorted(Path(folder).glob(f"{label}-s*/metrics.json")):
            suffix = path.parent.name[len(label) + 2:]
            if suffix.isdigit():
                found[int(suffix)] = json.loads(path.read_text())
    return dict(sorted(found.items()))


def decoder_cost(code: str, input_size: Sequence[int]) -> dict[str, float]:
    """Decoder (FPN + head) parameters and GFLOPs of ``code`` in the default experiment's detector."""
    from detector.arch.zoo import resolve_arch
    from detector.cli import compose
    from detector.model.cost import describe
    from detector.model.recipe import Recipe

    cfg = compose("train", [])
    info = describe(resolve_arch(code), str(cfg.backbone.name), int(cfg.data.num_classes),
                    input_size=list(input_size), recipe=Recipe.from_cfg(cfg.recipe), width=int(cfg.model.width))
    return {"params_m": (info["params"]["fpn"] + info["params"]["head"]) / 1e6,
            "gflops": info["gflops_per_part"]["fpn"] + info["gflops_per_part"]["head"]}


def summarize(entry: dict[str, Any], folders: Sequence[Path], input_size: Sequence[int]) -> dict[str, Any] | None:
    """One table row, or None when no seed of the entry was trained."""
    runs = seed_metrics(entry["label"], folders)
    if not runs:
        return None
    aps = [m["AP"] for m in runs.values()]
    speeds = [m["iterations"] * m["batch_size"] / m["train_seconds"] for m in runs.values() if m.get("train_seconds")]
    return {"label": entry["label"], "code": entry["code"], "searched": "from" in entry, "seeds": list(runs),
            "ap": statistics.mean(aps), "ap_std": statistics.stdev(aps) if len(aps) > 1 else 0.0,
            "ap50": statistics.mean(m["AP50"] for m in runs.values()),
            "img_per_s": statistics.mean(speeds) if speeds else float("nan"),
            **decoder_cost(entry["code"], input_size)}


def verdict(row: dict[str, Any], reference: dict[str, Any], max_ratio: float) -> str:
    """Whether ``row`` beats ``reference`` as the goal defines it, in words with the numbers."""
    margin = row["ap"] - reference["ap"]
    bar = 2 * max(row["ap_std"], reference["ap_std"])
    ratio = row["gflops"] / reference["gflops"]
    beats = margin > bar and ratio <= max_ratio
    return (f"{row['label']}: {margin:+.4f} AP against {reference['label']} (goal: more than 2 std = {bar:.4f}), "
            f"decoder GFLOPs {ratio:.2f}x (goal: at most {max_ratio}x): **{'met' if beats else 'missed'}**")


def write_outputs(rows: list[dict[str, Any]], reference_label: str, max_ratio: float, out: Path, name: str,
                  input_size: Sequence[int]) -> Path:
    lines = [f"# {name}", "", f"Command: `{command_line()}`", "",
             f"Decoder = FPN + head; GFLOPs at {input_size[0]} x {input_size[1]}. img/s: training speed of each run "
             "(runs that shared a GPU compare only within one call).", "",
             "| decoder | searched | seeds | AP (mean ± std) | AP50 | decoder params (M) | decoder GFLOPs | train img/s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['label']} | {'yes' if row['searched'] else ''} | {','.join(map(str, row['seeds']))} | "
                     f"{row['ap']:.4f} ± {row['ap_std']:.4f} | {row['ap50']:.4f} | {row['params_m']:.2f} | "
                     f"{row['gflops']:.1f} | {row['img_per_s']:.0f} |")
    reference = next((row for row in rows if row["label"] == reference_label), None)
    lines.append("")
    if reference is None:
        lines.append(f"No runs of the reference `{reference_label}`: no verdict.")
    else:
        lines += [f"- {verdict(row, reference, max_ratio)}" for row in rows if row["searched"]]
    path = out / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    plot(rows, out / f"{name}.png")
    return path


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for row in rows:
        color = "tab:red" if row["searched"] else "tab:blue"
        ax.errorbar(row["gflops"], row["ap"], yerr=row["ap_std"], fmt="o", color=color, capsize=4)
        ax.annotate(row["label"], (row["gflops"], row["ap"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("decoder GFLOPs (FPN + head)")
    ax.set_ylabel("AP after full training (mean ± std over seeds)")
    ax.set_title("searched (red) against hand-made (blue) decoders")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def joined_entries(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """The entries of every list file, in order; a label that an earlier file named is skipped."""
    entries: dict[str, dict[str, Any]] = {}
    for path in paths:
        for entry in json.loads(path.read_text()):
            entries.setdefault(entry["label"], entry)
    return list(entries.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", nargs="+", required=True,
                        help="JSON lists of {label, code, from?}; several are joined in order, a label once")
    parser.add_argument("--ground-truth", nargs="+", required=True, help="folders of <label>-s<seed>/metrics.json")
    parser.add_argument("--out", required=True)
    parser.add_argument("--name", default="headline")
    parser.add_argument("--reference", default="fcos")
    parser.add_argument("--max-gflops-ratio", type=float, default=1.5)
    parser.add_argument("--input-size", nargs=2, type=int, default=[800, 1333])
    args = parser.parse_args(argv)
    entries = joined_entries(Path(path) for path in args.list)
    folders = [Path(folder) for folder in args.ground_truth]
    rows = [row for row in (summarize(entry, folders, args.input_size) for entry in entries) if row is not None]
    missing = [entry["label"] for entry in entries if entry["label"] not in {row["label"] for row in rows}]
    if missing:
        print(f"no runs found for {', '.join(missing)}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(write_outputs(rows, args.reference, args.max_gflops_ratio, out, args.name, args.input_size).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
