"""Checks on the paths a user names for a command's output (``out=``), made before any work.

One rule for every command that writes where the user says (``search show out=``, ``detector
infer out=``, ``eval out=``, ``synth out=``): nothing the user already has is replaced, the file
kind is one the command can write, and a path that cannot be written is one line (:class:`UserError`)
before minutes of work, not a traceback after them.

- :func:`output_file`: one file. A name without a suffix gets the command's default suffix (so
  the path printed is the path written); another suffix than the command's is refused; an
  existing file is refused unless ``owned(path)`` says the command itself wrote it (a diagram
  redrawn); a folder at that path is refused; the folder it goes into must be writable.
- :func:`output_folder`: a folder the command writes named files into. An existing file at that
  path is refused, and so is any of ``names`` already there (nothing is overwritten); the folder
  (or the nearest existing folder above it) must be writable.

- :func:`write_error`: an OSError met while writing all the same, as one line: a full disk as
  :class:`WriteError` (with the free space), anything else naming the key to change.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

from detector.errors import UserError, WriteError


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _check_writable_folder(folder: Path, key: str, shown: object) -> None:
    """``folder`` (created later if missing) can be written: its nearest existing ancestor is a
    folder this process may create files in."""
    existing = _nearest_existing(folder.absolute())
    if not existing.is_dir():
        raise UserError(f"{key}={shown}: {existing} is a file, not a folder; pass {key}=<a path in a writable folder>")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{key}={shown}: {existing} cannot be written (permission denied); pass {key}=<a path in "
                        "a writable folder>")


def output_file(value: object, key: str, suffixes: Sequence[str],
                owned: Callable[[Path], bool] = lambda path: False) -> Path:
    """The checked path of one output file named by ``key=value`` (see the module doc).

    ``suffixes``: the lower-case suffixes the command writes, the first being the default.
    """
    text = str(value).strip()
    if not text:
        raise UserError(f"{key} is empty; pass {key}=<file{suffixes[0]}>")
    path = Path(text).expanduser()
    if path.name in ("", ".", "..") or text.endswith(os.sep):
        raise UserError(f"{key}={value}: names a folder; pass {key}=<file{suffixes[0]}>")
    if not path.suffix:
        path = path.with_name(path.name + suffixes[0])
    elif path.suffix.lower() not in suffixes:
        raise UserError(f"{key}={value}: cannot write a '{path.suffix}' file; use {' or '.join(suffixes)}")
    if path.is_dir():
        raise UserError(f"{key}={path} is a folder; pass {key}=<file{suffixes[0]}>")
    if (path.exists() or path.is_symlink()) and not owned(path):
        raise UserError(f"{key}={path} already exists and was not written by this command; pass another {key} "
                        "or remove it (nothing was overwritten)")
    _check_writable_folder(path.parent, key, value)
    return path


def output_folder(value: object, key: str, names: Iterable[str]) -> Path:
    """The checked path of a folder that will receive the files ``names`` (see the module doc)."""
    text = str(value).strip()
    if not text:
        raise UserError(f"{key} is empty; pass {key}=<folder>")
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{key}={path} is a file, not a folder; pass {key}=<folder>")
    clashes = [name for name in names if (path / name).exists() or (path / name).is_symlink()]
    if clashes:
        more = f" (and {len(clashes) - 1} more of the files to write)" if len(clashes) > 1 else ""
        raise UserError(f"{key}={path} already holds {clashes[0]}{more}; pass a new or empty {key} folder "
                        "(nothing was overwritten)")
    _check_writable_folder(path, key, value)
    return path



def write_error(path: object, key: str, err: OSError) -> UserError:
    """The one line for ``err`` met writing ``path`` (named by ``key=``)."""
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return WriteError.from_failure(path, err)
    text = str(err).strip()
    reason = getattr(err, "strerror", None) or (text.splitlines()[0] if text else type(err).__name__)
    return UserError(f"cannot write {path} ({reason}); pass {key}=<a writable path>")
