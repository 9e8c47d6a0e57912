"""Where a training run writes, and the checks made before anything is written there.

The run directory is, in order of precedence:

1. ``out_dir=<dir>`` when given;
2. the Hydra multirun job directory (``hydra.sweep.dir/<job number>``) inside ``-m`` sweeps;
3. ``runs/train/<YYYYmmdd-HHMMSS>-<short arch name>`` under the current directory.

A run directory holds ``config.yaml`` (the resolved config), ``log.jsonl``, checkpoints
(``last.pt``, ``previous.pt``), ``final.pt`` (weights only), ``detections_val.json`` and, once
the run has finished, ``metrics.json`` (or ``diverged.json`` when its loss became NaN/inf). :func:`prepare_check` refuses (one-line :class:`RunDirError`)
a directory that cannot be written, and one that already holds a run unless ``resume=true``,
so that nothing is ever overwritten by accident.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from detector.errors import UserError
from detector.arch.zoo import ZOO

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
LOG_FILE = "log.jsonl"
DETECTIONS_FILE = "detections_val.json"
DIVERGED_FILE = "diverged.json"  # written when the loss became NaN/inf: {"iteration", "error"}
FINAL_WEIGHTS = "final.pt"
DEFAULT_ROOT = Path("runs") / "train"
_RUN_MARKERS = ("last.pt", "previous.pt", METRICS_FILE)


class RunDirError(UserError):
    """The run directory cannot be used (unwritable, or it holds a run and resume is off)."""


def short_arch_name(code: str) -> str:
    """A zoo name when the code is one, else ``custom-<8 hex digits of the code's hash>``."""
    for name, zoo_code in ZOO.items():
        if str(code) == zoo_code:
            return name
    return "custom-" + hashlib.sha1(str(code).encode()).hexdigest()[:8]


def hydra_job_dir() -> Path | None:
    """The current Hydra multirun job's output directory, or None outside ``-m`` sweeps."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return Path(hydra_cfg.runtime.output_dir)


def resolve(out_dir: Any, code: str) -> Path:
    """The run directory for ``out_dir`` (may be None) and architecture ``code`` (see module doc)."""
    if out_dir is not None and str(out_dir).strip():
        return Path(str(out_dir)).expanduser()
    job_dir = hydra_job_dir()
    if job_dir is not None:
        return job_dir
    return DEFAULT_ROOT / f"{time.strftime('%Y%m%d-%H%M%S')}-{short_arch_name(code)}"


def holds_run(path: Path) -> bool:
    """Whether ``path`` already holds (part of) a training run."""
    return any((path / marker).exists() for marker in _RUN_MARKERS)


def is_finished(path: Path) -> bool:
    return (path / METRICS_FILE).is_file()


def ensure_writable(path: Path, what: str = "out_dir") -> None:
    """Create ``path`` and prove a file can be written there; RunDirError otherwise."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise RunDirError(f"{what}={path} cannot be written ({reason}); pass {what}=<a writable folder>") from None


def prepare_check(path: Path, resume: bool) -> Path:
    """Refuse to overwrite a run, or to resume nothing; writes nothing (see :func:`ensure_writable`)."""
    if path.exists() and not path.is_dir():
        raise RunDirError(f"out_dir={path} is a file, not a folder; pass out_dir=<folder>")
    if resume:
        if not holds_run(path):
            raise RunDirError(f"resume=true but {path} holds no run (no last.pt); pass out_dir=<the run to "
                              "continue> or drop resume=true")
    elif holds_run(path):
        state = "a finished run" if is_finished(path) else "an unfinished run"
        raise RunDirError(f"out_dir={path} already holds {state}; pass resume=true to continue it, "
                          "or another out_dir (nothing was overwritten)")
    return path


def save_config(cfg: Any, path: Path) -> Path:
    """Write the resolved config as ``config.yaml``."""
    target = path / CONFIG_FILE
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    os.replace(tmp, target)
    return target


def write_json(path: Path, value: Any) -> Path:
    """Write ``value`` as JSON through a temp file and a rename."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return path
