"""A search run directory: creation, resumption, the lock, and the small files it holds.

Layout (``runs/search/<YYYYmmdd-HHMMSS>/`` unless ``search.run_dir`` says otherwise)::

    config.yaml                 the resolved configuration of the run (what a resume uses)
    history.jsonl               one line per finished trial (search.history), the source of truth
    searcher-<i>-<stage>.pt     the searcher of stage i (controller weights, optimizer, baseline,
                                RNG, pending proposals), saved atomically after every ask and tell
    state.json                  loop state for humans and tools: stage, pending trials, counts
    best.txt                    the best code so far (``python -m detector train arch=<run_dir>``)
    report.md, *.png            written by ``python -m search report run=<run_dir>``
    ray/                        Ray Tune's own experiment folders (executor=ray only)
    .lock                       held (fcntl.flock) by the search using the directory

The lock is an exclusive ``flock`` on ``.lock``, held for as long as the search process lives;
the kernel releases it when the process exits or is killed (even with SIGKILL), so a stale lock
cannot outlive its owner. A second search on the same directory is refused with a
:class:`UserError` naming the owner's pid.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

from detector.errors import UserError, WriteError
from detector.arch.zoo import BEST_FILE

CONFIG_FILE = "config.yaml"
STATE_FILE = "state.json"
LOCK_FILE = ".lock"
DEFAULT_ROOT = Path("runs") / "search"


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a fsync'ed temporary file and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:  # a full disk: the old file stays, the temporary one goes
        tmp.unlink(missing_ok=True)
        raise WriteError.from_failure(path, err) from err
    os.replace(tmp, path)
    return path


class RunDir:
    """An open (and locked) run directory. Use :func:`create_run_dir` or :func:`open_run_dir`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.created = False  # whether create_run_dir made the folder (see discard_unstarted)
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ lock
    def lock(self) -> "RunDir":
        """Take the directory's exclusive lock; :class:`UserError` if another search holds it."""
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(
                f"run dir '{self.path}' is in use by another search (pid {owner}); wait for it to "
                "finish or stop it, or use another run dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        return self

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.unlock()

    # ------------------------------------------------------------------ files
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def history_path(self) -> Path:
        from search.history import HISTORY_FILE

        return self.path / HISTORY_FILE

    @property
    def best_path(self) -> Path:
        return self.path / BEST_FILE

    def searcher_path(self, stage_index: int, stage: str) -> Path:
        return self.path / f"searcher-{stage_index}-{stage}.pt"

    def write_config(self, container: dict[str, Any]) -> None:
        from omegaconf import OmegaConf

        atomic_write_text(self.config_path, OmegaConf.to_yaml(OmegaConf.create(container)))

    def read_config(self):
        from omegaconf import OmegaConf

        try:
            return OmegaConf.load(self.config_path)
        except Exception as err:  # noqa: BLE001 - yaml and omegaconf errors alike
            raise UserError(f"{self.config_path}: unreadable ({type(err).__name__}); restore the run's "
                            "config.yaml") from None

    def write_state(self, state: dict[str, Any]) -> None:
        atomic_write_text(self.path / STATE_FILE, json.dumps(state, indent=1) + "\n")

    def read_state(self) -> dict[str, Any]:
        path = self.path / STATE_FILE
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}  # a mirror of history + searcher state; never needed to resume

    def write_best(self, code: str) -> None:
        atomic_write_text(self.best_path, code + "\n")

    def started(self) -> bool:
        """Whether a trial ever began here: history rows or a saved searcher exist."""
        history = self.history_path
        return (history.is_file() and history.stat().st_size > 0) or any(self.path.glob("searcher-*.pt"))

    def discard_unstarted(self) -> None:
        """Remove what this search wrote into a run that never began a trial (its config, state and
        lock), and the folder itself when :func:`create_run_dir` made it and it is now empty: a
        failed start leaves no junk and no run that refuses the corrected command."""
        if self.started():
            return
        for name in (CONFIG_FILE, STATE_FILE, LOCK_FILE):
            (self.path / name).unlink(missing_ok=True)
        if self.created:
            try:
                self.path.rmdir()
            except OSError:
                pass  # something else is there: keep it


def _fresh_path(root: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = root / stamp, 1
    while path.exists():
        path, n = root / f"{stamp}-{n}", n + 1
    return path


def is_search_run(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a search run: a ``config.yaml`` with the sections only a search's
    config has (``search`` and ``space``). A training run's folder has a config.yaml too."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(config)
    except Exception:  # noqa: BLE001 - unreadable: decided by open_run_dir's read_config
        return True
    return OmegaConf.is_dict(cfg) and "search" in cfg and "space" in cfg


def _not_a_search_run(key: str, path: Path) -> UserError:
    what = (f"its {CONFIG_FILE} has no search and space sections: a training run?" if (path / CONFIG_FILE).is_file()
            else f"no {CONFIG_FILE}")
    return UserError(f"{key}: '{path}' is not a search run directory ({what}); give the directory that "
                     "`python -m search run` created (runs/search/<time>)")


def create_run_dir(run_dir: str | os.PathLike | None) -> RunDir:
    """Create and lock a new run directory (``runs/search/<time>`` when ``run_dir`` is None);
    ``created`` on it says whether this call created the folder.

    An explicit directory may exist only if it holds no started run (:meth:`RunDir.started`: a
    run that never began a trial is started afresh with the new settings); otherwise
    :class:`UserError` suggests ``resume=``.
    """
    if run_dir is None or str(run_dir).strip() == "":
        path = _fresh_path(DEFAULT_ROOT)
    else:
        path = Path(str(run_dir)).expanduser()
        if path.exists() and not path.is_dir():
            raise UserError(f"search.run_dir: '{path}' is a file; give a directory path")
    if (path / CONFIG_FILE).exists() and not is_search_run(path):
        raise UserError(f"search.run_dir: '{path}' holds a config.yaml that is not a search's (a training "
                        "run?); choose another search.run_dir (nothing was overwritten)")
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    run = RunDir(path).lock()
    if run.config_path.exists() and run.started():
        run.unlock()
        raise UserError(
            f"search.run_dir: '{path}' already holds a search run; continue it with resume={path} "
            "or choose another search.run_dir"
        )
    run.created = created
    return run


def open_run_dir(path: str | os.PathLike) -> RunDir:
    """Open and lock an existing run directory for resuming; :class:`UserError` if it is not one."""
    path = Path(str(path)).expanduser()
    if not path.is_dir():
        raise UserError(f"resume: '{path}' is not a directory; give the run directory of a search "
                        "(e.g. runs/search/<time>)")
    if not is_search_run(path):
        raise _not_a_search_run("resume", path)
    return RunDir(path).lock()


def check_run_dir(path: str | os.PathLike | None, key: str = "run") -> Path:
    """The path of an existing run directory to read (report); :class:`UserError` otherwise."""
    if path is None or str(path).strip() == "":
        raise UserError(f"{key}: give a search run directory, e.g. {key}=runs/search/<time>")
    path = Path(str(path)).expanduser()
    if not path.is_dir():
        raise UserError(f"{key}: '{path}' is not a directory; give a search run directory")
    if not is_search_run(path):
        raise _not_a_search_run(key, path)
    return path
