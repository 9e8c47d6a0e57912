"""Run logging: a local JSONL file always, Weights & Biases when ``logger=wandb``.

``build_logger(cfg, run_dir)`` returns a :class:`RunLogger`:

- ``log(metrics, step)`` appends ``{"step": step, "time": <unix s>, **metrics}`` as one line to
  ``<run_dir>/log.jsonl`` (flushed at once, so a killed run keeps what it logged) and, with wandb,
  calls ``wandb.log(metrics, step=step)``;
- ``log_summary(values)`` appends ``{"summary": values}`` and sets wandb's run summary;
- ``finish()`` closes both.

wandb (``conf/logger/wandb.yaml``: project, entity, mode, tags) runs offline by default; sync later
with ``wandb sync <run_dir>/wandb/offline-run-*``. Its run config is the resolved config plus
``arch_code`` (the canonical architecture code), and its files live under ``<run_dir>/wandb``.
Call it from the driver process only (rank 0; never inside a Ray worker). The search driver
reuses this module with its own run directory.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from detector.errors import UserError

LOG_FILE = "log.jsonl"
LOGGER_NAMES = ("none", "wandb")
WANDB_MODES = ("offline", "online", "disabled")


class LoggerError(UserError):
    """A bad ``logger`` config, or wandb missing when asked for."""


def _plain(value: Any) -> Any:
    """JSON-safe scalars: tensors and numpy numbers to floats, non-finite floats to strings."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunLogger:
    """JSONL file logger with an optional wandb run behind it (see module doc)."""

    def __init__(self, run_dir: str | os.PathLike, wandb_run: Any = None, filename: str = LOG_FILE) -> None:
        self.path = Path(run_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self.wandb_run = wandb_run

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Record ``metrics`` (name -> number or string) at ``step`` (an iteration or trial number)."""
        values = {str(k): _plain(v) for k, v in metrics.items()}
        self._write({"step": int(step), "time": round(time.time(), 3), **values})
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=int(step))

    def log_summary(self, values: dict[str, Any]) -> None:
        """Record final values (best metric, final AP, wall time...)."""
        values = {str(k): _plain(v) for k, v in values.items()}
        self._write({"summary": values, "time": round(time.time(), 3)})
        if self.wandb_run is not None:
            for key, value in values.items():
                self.wandb_run.summary[key] = value

    def finish(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


def _start_wandb(logger_cfg: Any, run_dir: Path, config: dict[str, Any], name: str | None) -> Any:
    mode = str(logger_cfg.get("mode", "offline"))
    if mode not in WANDB_MODES:
        raise LoggerError(f"logger.mode={mode}: use one of {', '.join(WANDB_MODES)}")
    try:
        import wandb
    except ImportError:
        raise LoggerError("logger=wandb but the wandb package is not installed; pip install wandb "
                          "or use logger=none") from None
    tags = logger_cfg.get("tags", None)
    return wandb.init(
        project=str(logger_cfg.get("project", "nasfcos")),
        entity=logger_cfg.get("entity", None),
        mode=mode,
        dir=str(run_dir),
        config=config,
        name=name,
        tags=list(tags) if tags else None,
    )


def build_logger(cfg: Any, run_dir: str | os.PathLike, arch_code: str | None = None,
                 name: str | None = None, filename: str = LOG_FILE) -> RunLogger:
    """The run's logger: JSONL in ``run_dir`` plus wandb when ``cfg.logger.name == "wandb"``.

    ``arch_code`` (default ``cfg.arch``) is stored in wandb's config as ``arch_code``; ``name`` is
    the wandb run name (default: the run directory's name).
    """
    run_dir = Path(run_dir)
    logger_cfg = cfg.get("logger", None) or {"name": "none"}
    kind = str(logger_cfg.get("name", "none"))
    if kind not in LOGGER_NAMES:
        raise LoggerError(f"logger={kind}: use one of {', '.join(LOGGER_NAMES)}")
    wandb_run = None
    if kind == "wandb":
        config = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
        config["arch_code"] = str(arch_code if arch_code is not None else cfg.get("arch", ""))
        run_dir.mkdir(parents=True, exist_ok=True)
        wandb_run = _start_wandb(logger_cfg, run_dir, config, name or run_dir.name)
    return RunLogger(run_dir, wandb_run, filename)
