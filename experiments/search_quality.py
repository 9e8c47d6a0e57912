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

Each study is its own script (experiments/study_searchers.py, study_fidelity.py,
study_short_training.py; shared pieces in study_common.py and study_stats.py); this one runs any of
them by name, so the commands above and those recorded in experiments/search_quality/ still work.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SCRIPTS = {"searchers": "study_searchers", "fidelity": "study_fidelity", "short-training": "study_short_training"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in SCRIPTS:
        print(f"usage: python experiments/search_quality.py {{{'|'.join(SCRIPTS)}}} [options]  "
              "(each study's options: python experiments/study_<name>.py --help)", file=sys.stderr)
        return 2
    return importlib.import_module(SCRIPTS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
