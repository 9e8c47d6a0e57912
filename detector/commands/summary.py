"""``python -m detector summary sweep=<dir>``: one table row per training job of a sweep.

A sweep is what ``python -m detector train -m arch=fcos,nasfcos seed=0,1`` leaves behind: one job
directory per combination under ``hydra.sweep.dir``. Every directory below ``sweep`` that holds a
run (``config.yaml``) becomes a row: its job name (path relative to the sweep), arch (zoo name or
``custom-<hash>``), seed, AP and AP50 in percent, and training time in seconds, from
``metrics.json``; a job whose loss became NaN/inf (``diverged.json``) is listed as diverged, any
other job without metrics as unfinished. Rows are ordered by job number.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from detector.errors import UserError
from detector.engine.run_dir import CONFIG_FILE, DIVERGED_FILE, METRICS_FILE, short_arch_name

COLUMNS = ("job", "arch", "seed", "AP", "AP50", "time_s", "status")


class SweepError(UserError):
    """sweep= is unset, missing, or holds no training runs."""


def _job_key(name: str) -> tuple:
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in Path(name).parts)


def _read_job(job_dir: Path, sweep: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"job": str(job_dir.relative_to(sweep)) if job_dir != sweep else "."}
    metrics_file = job_dir / METRICS_FILE
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {**row, "arch": "?", "seed": "?", "status": "unreadable metrics.json"}
        return {**row, "arch": metrics.get("arch_name") or short_arch_name(metrics.get("arch", "")),
                "seed": metrics.get("seed"), "AP": 100 * float(metrics["AP"]), "AP50": 100 * float(metrics["AP50"]),
                "time_s": float(metrics.get("train_seconds", 0.0)), "status": "finished"}
    try:
        cfg = OmegaConf.load(job_dir / CONFIG_FILE)
        arch, seed = str(cfg.get("arch", "?")), cfg.get("seed", "?")
    except Exception:  # a half-written config: still list the job
        arch, seed = "?", "?"
    status = "diverged" if (job_dir / DIVERGED_FILE).is_file() else "unfinished"
    return {**row, "arch": arch, "seed": seed, "status": status}


def summarize(sweep: str | Path) -> list[dict[str, Any]]:
    """Rows (dicts with :data:`COLUMNS` keys; AP/AP50/time_s only for finished jobs) of a sweep dir."""
    sweep = Path(sweep).expanduser()
    if not sweep.is_dir():
        raise SweepError(f"sweep={sweep} is not a folder; pass the sweep directory (hydra.sweep.dir)")
    job_dirs = sorted({p.parent for p in sweep.rglob(CONFIG_FILE) if p.parent.name != ".hydra"},
                      key=lambda p: _job_key(str(p.relative_to(sweep))))
    if not job_dirs:
        raise SweepError(f"sweep={sweep} holds no training runs (no {CONFIG_FILE} below it)")
    return [_read_job(job_dir, sweep) for job_dir in job_dirs]


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width text table of :func:`summarize` rows."""
    def cell(row: dict[str, Any], key: str) -> str:
        value = row.get(key)
        if value is None:
            return "-"
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    table = [list(COLUMNS)] + [[cell(row, key) for key in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in table)


def summary_command(cfg: Any) -> list[dict[str, Any]]:
    """Print the metrics table of ``cfg.sweep``."""
    sweep = cfg.get("sweep", None)
    if sweep is None or not str(sweep).strip():
        raise SweepError("sweep is not set; pass sweep=<the sweep directory, e.g. runs/sweeps/<date>>")
    rows = summarize(str(sweep))
    print(format_table(rows))
    return rows
