"""Training throughput of arch=nasfcos for each fast-DCN option set, against our fcos in the same run.

Each row runs ``detector.commands.bench`` (batch 16, 800 x <= 1333, bf16 + channels_last, all fast paths)
with ``detector.fast.deform.DEFAULT_OPTIONS`` set to one of ``bench_dcn.VARIANTS``; the first row
is our fcos (no DCN), the reference of the "vs fcos" column (issue target: nasfcos >= 0.6x).

    python experiments/bench_deform_options.py --device cuda            # on the GPU machine
    python experiments/bench_deform_options.py --device cpu --quick     # plumbing smoke run

Prints a table; ``--json`` also writes the rows.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from bench_dcn import VARIANTS  # noqa: E402
from detector.fast import deform as fast_deform  # noqa: E402
from detector.commands.bench import bench  # noqa: E402


def bench_config(arch: str, device: str, quick: bool, iters: int) -> dict:
    """A plain-dict config as `python -m detector bench` composes it, trimmed to the training row."""
    settings = yaml.safe_load((ROOT / "conf" / "bench.yaml").read_text())["bench"]
    settings.update(quick=quick, iters=iters, infer_batches=[8], infer_iters=4, deform_impl=["fast"],
                    torchvision="none", self_check=False, ablate=False)
    recipe = yaml.safe_load((ROOT / "conf" / "recipe" / "nasfcos.yaml").read_text())
    return {"arch": arch, "device": device, "format": "json", "seed": 0, "recipe": recipe, "bench": settings}


def train_row(result: dict) -> dict:
    row = next(r for r in result["rows"] if r["name"].startswith("ours"))
    if "error" in row:
        raise RuntimeError(row["error"])
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run; numbers mean nothing)")
    parser.add_argument("--iters", type=int, default=12, help="timed training iterations per row")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)

    rows = []
    reference = train_row(bench(bench_config("fcos", args.device, args.quick, args.iters)))
    rows.append({"variant": "fcos (no DCN)", **reference})
    default = fast_deform.DEFAULT_OPTIONS
    for name in args.variants:
        fast_deform.DEFAULT_OPTIONS = fast_deform.DeformOptions(*VARIANTS[name])
        try:
            rows.append({"variant": f"nasfcos, {name}", **train_row(bench(bench_config(
                "nasfcos", args.device, args.quick, args.iters)))})
        except Exception as err:  # one failing variant must not hide the others
            rows.append({"variant": f"nasfcos, {name}", "error": f"{type(err).__name__}: {err}"})
        finally:
            fast_deform.DEFAULT_OPTIONS = default

    base = reference["train_images_per_s"]
    print(f"{'variant':<48}{'train img/s':>12}{'step ms':>9}{'vs fcos':>9}{'peak GB':>9}")
    for row in rows:
        if "error" in row:
            print(f"{row['variant']:<48}  failed: {row['error'][:200]}")
            continue
        speed = row["train_images_per_s"]
        peak = row.get("train_peak_memory_gb")  # CUDA only
        print(f"{row['variant']:<48}{speed:>12.1f}{row['train_step_ms']:>9.1f}{speed / base:>8.2f}x"
              f"{'-' if peak is None else f'{peak:.1f}':>9}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
