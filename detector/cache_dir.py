"""Where generated data and feature caches live.

`default_cache_dir()` is ``$XDG_CACHE_HOME/nasfcos`` (``~/.cache/nasfcos`` when the variable is
unset or empty). The top-level config key ``cache_dir`` overrides it; ``null`` means the default,
which is what `resolve_cache_dir` implements. Nothing is created here: writers create what
they need.
"""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "nasfcos"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/nasfcos``, or ``~/.cache/nasfcos`` without that variable."""
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / APP_NAME


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """The configured ``cache_dir`` (``~`` expanded), or `default_cache_dir()` when it is None."""
    if cache_dir is None or str(cache_dir).strip() == "":
        return default_cache_dir()
    return Path(cache_dir).expanduser()
