"""``python -m detector train ...``: train a detector (:func:`detector.engine.train.train`) and print
its final COCO metrics."""
from __future__ import annotations

import os
from typing import Any

from detector.data.coco_eval import METRIC_NAMES, format_metrics
from detector.engine.train import train


def train_command(cfg: Any) -> dict[str, Any]:
    """``python -m detector train ...``: train, then print the final COCO metrics (rank 0)."""
    result = train(cfg)
    if "stopped_at" in result:
        print(f"stopped after iteration {result['stopped_at']} (train.stop_after); resume with "
              f"out_dir={result['run_dir']} resume=true")
    elif "AP" in result and int(os.environ.get("RANK", "0") or 0) == 0:
        print(format_metrics({name: result[name] for name in METRIC_NAMES}))
        print(f"{result['arch_name']}: AP {100 * result['AP']:.1f}, AP50 {100 * result['AP50']:.1f} after "
              f"{result['iterations']} iterations ({result['train_seconds']:.0f} s of training); run dir "
              f"{result['run_dir']}")
    return result
