"""Training checkpoints: what they hold, atomic writes, and loading with a fallback.

A checkpoint is one ``torch.save`` file of plain data (loadable with ``weights_only=True``)::

    format, version          "nasfcos-detector", 1
    arch                     the canonical architecture code (str)
    config                   the resolved run config (plain dicts/lists)
    iteration                number of optimizer steps done
    model                    model state dict (always the unwrapped module's)
    optimizer, scheduler     state dicts (training checkpoints only)
    scaler                   AMP GradScaler state dict (fp16 only, else None)
    rng                      torch, cuda, numpy and python RNG states
    class_names, label_to_cat_id   for drawing and COCO export

A run directory keeps ``last.pt`` (newest), ``previous.pt`` (the one before) and optionally the
newest ``train.keep_checkpoints`` numbered copies ``ckpt_<iteration>.pt``. Every file is written
to a temp file in the same directory and renamed into place (``os.replace``), so a crash never
leaves a half-written ``last.pt``; if one is damaged anyway (a full disk, a copy cut short),
:func:`load_latest` says so and falls back to the next good one.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.errors import UserError, WriteError

log = logging.getLogger(__name__)

FORMAT, VERSION = "nasfcos-detector", 1
LAST, PREVIOUS = "last.pt", "previous.pt"
_NUMBERED = re.compile(r"ckpt_(\d+)\.pt")


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, not ours, or for another architecture."""


# ----------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a training step can touch: torch CPU, CUDA (if initialised), numpy, python."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only where the GPU count matches)."""
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["internal"]), py_state["gauss_next"]))


# ----------------------------------------------------------------------------- writing


def _dump_to_temp(payload: dict[str, Any], directory: Path, name: str) -> str:
    """``torch.save`` into a new temp file in ``directory``, flushed to disk; returns its name."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as err:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)):  # a full disk: torch reports "unexpected pos"
            raise WriteError.from_failure(Path(directory) / name, err) from err
        raise
    return tmp_name


def save_atomic(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a checkpoint file at ``path`` through a temp file and a rename (never half-written)."""
    path = Path(path)
    tmp_name = _dump_to_temp({"format": FORMAT, "version": VERSION, **payload}, path.parent, path.name)
    os.replace(tmp_name, path)
    return path


def write_training_checkpoint(payload: dict[str, Any], run_dir: str | os.PathLike, keep: int = 0) -> Path:
    """Write ``last.pt`` (the old one becomes ``previous.pt``), plus a numbered copy if ``keep`` > 0."""
    run_dir = Path(run_dir)
    tmp_name = _dump_to_temp({"format": FORMAT, "version": VERSION, **payload}, run_dir, LAST)
    try:
        if keep > 0:
            numbered = run_dir / f"ckpt_{int(payload['iteration']):07d}.pt"
            shutil.copyfile(tmp_name, f"{tmp_name}.copy")
            os.replace(f"{tmp_name}.copy", numbered)
            _prune_numbered(run_dir, keep)
        last = run_dir / LAST
        if last.exists():
            os.replace(last, run_dir / PREVIOUS)
        os.replace(tmp_name, last)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        Path(f"{tmp_name}.copy").unlink(missing_ok=True)
        raise
    return run_dir / LAST


def _numbered(run_dir: Path) -> list[Path]:
    """Numbered checkpoints, newest first."""
    found = [(int(m.group(1)), p) for p in run_dir.glob("ckpt_*.pt") if (m := _NUMBERED.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def _prune_numbered(run_dir: Path, keep: int) -> None:
    for old in _numbered(run_dir)[keep:]:
        old.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- reading


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read one checkpoint; CheckpointError (one line) if it is missing, damaged or not ours."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass ckpt=<run dir>/last.pt")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for damaged files (EOF, zip, unpickling)
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is damaged or not a torch checkpoint ({reason}); "
                              "use another checkpoint (previous.pt sits next to last.pt)") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} was not written by `python -m detector train` "
                              "(no 'format: nasfcos-detector' field)")
    if int(payload.get("version", 0)) > VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {payload['version']}, newer than this code "
                              f"({VERSION}); update the code")
    for key in ("arch", "config", "model", "iteration"):
        if key not in payload:
            raise CheckpointError(f"checkpoint {path} lacks the '{key}' entry; it is incomplete")
    return payload


def candidates(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints of a run directory in the order to try them: last, previous, numbered newest first."""
    run_dir = Path(run_dir)
    ordered = [run_dir / LAST, run_dir / PREVIOUS, *_numbered(run_dir)]
    return [p for p in ordered if p.is_file()]


def load_latest(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path]:
    """The newest readable checkpoint of ``run_dir`` (warning about each damaged one skipped)."""
    found = candidates(run_dir)
    if not found:
        raise CheckpointError(f"resume=true but {run_dir} holds no checkpoint ({LAST}); "
                              "drop resume=true to start a new run")
    errors = []
    for path in found:
        try:
            payload = load_checkpoint(path, map_location)
        except CheckpointError as err:
            log.warning("%s; trying the previous checkpoint", err)
            errors.append(path.name)
            continue
        if errors:
            log.warning("resuming from %s (damaged: %s)", path.name, ", ".join(errors))
        return payload, path
    raise CheckpointError(f"every checkpoint in {run_dir} is damaged ({', '.join(errors)}); "
                          "start a new run without resume=true")


def check_arch(payload: dict[str, Any], code: str, source: str = "checkpoint") -> None:
    """Refuse a checkpoint trained for another architecture code than ``code``."""
    if str(payload["arch"]) != str(code):
        raise CheckpointError(f"{source} holds arch '{payload['arch']}' but arch='{code}' was asked for; "
                              "pass the checkpoint's arch (or drop arch= for eval/infer)")
