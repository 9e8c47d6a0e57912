"""What the search-quality studies share: the proxy task, the processes they start, the command
line (every study takes the same options), the history rows they read.

The studies, one script each (every one resumable, writing a markdown table and a PNG under --out):
experiments/study_searchers.py, experiments/study_fidelity.py, experiments/study_short_training.py;
experiments/search_quality.py runs any of them by name (the commands of earlier sessions). Rank
statistics: experiments/study_stats.py.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence


ROOT = Path(__file__).resolve().parents[1]
for entry in (ROOT, ROOT / "experiments"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from search.history import read_history  # noqa: E402


STUDIES = ("searchers", "fidelity", "short-training")


CONTROLLERS = ("ppo", "reinforce", "random", "evolution")

# The proxy task of both studies: the synthetic data of the default training experiment
# (experiment=synthetic_fcos), so that proxy and full training see the same images.


SYNTHETIC_DATA = ("data.num_train=1024", "data.num_val=128", "data.image_min_side=64", "data.image_max_side=128",
                  "data.large_every=0", "data.max_objects=4", "data.min_object_size=16")


PROXY_OVERRIDES = SYNTHETIC_DATA + ("proxy_eval.resolution=128", "proxy_eval.train_images=256",
                                    "proxy_eval.val_images=64", "proxy_eval.adapt_iters=150",
                                    "proxy_eval.iters=30", "proxy_eval.batch_size=4")


TRAIN_OVERRIDES = ("experiment=synthetic_fcos", "schedule.iterations=600", "train.progress=false")


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


def command_line() -> str:
    """The command that is running, as a person would retype it from the repository root."""
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0].endswith(".py") else "search_quality.py"
    return f"PYTHONPATH=. python experiments/{script} " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def build_parser(description: str) -> argparse.ArgumentParser:
    """The options of every study (each study reads the ones it needs)."""
    parser = argparse.ArgumentParser(description=description)
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
    return parser


def parse_study_args(study: str, description: str, argv: list[str] | None = None) -> argparse.Namespace | None:
    """Parsed and checked options of ``study`` (None after printing an error: exit code 2)."""
    parser = build_parser(description)
    args = parser.parse_args(argv)
    if args.budget < 4 or args.archs < 3 or args.jobs < 1:
        print("error: --budget must be >= 4, --archs >= 3 and --jobs >= 1", file=sys.stderr)
        return None
    args.cache_dir = args.cache_dir or str(Path(args.work) / "cache")
    args.search = [*args.search, *args.search_extra]
    Path(args.work).mkdir(parents=True, exist_ok=True)
    args.study = study
    return args
