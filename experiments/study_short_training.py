"""Search-quality study 3: does the AP after a part of full training rank like the final AP?

    PYTHONPATH=. python experiments/study_short_training.py --archs-file <list> --ground-truth <dir> \
        --along <dir of runs evaluated along the way>"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Sequence


ROOT = Path(__file__).resolve().parents[1]
for entry in (ROOT, ROOT / "experiments"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from study_common import command_line, parse_study_args  # noqa: E402
from study_fidelity import ground_truth_ap, pick_architectures  # noqa: E402
from study_stats import rank_correlations  # noqa: E402


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


def main(argv: list[str] | None = None) -> int:
    args = parse_study_args("short-training", __doc__.splitlines()[0], argv)
    return 2 if args is None else short_training_study(args)


if __name__ == "__main__":
    sys.exit(main())
