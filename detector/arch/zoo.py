"""The catalogue of named architectures, and resolution of what users type after ``arch=``.

Named whole architectures (usable as ``arch=<name>``):

- ``nasfcos``: the published NAS-FCOS decoder (authors' configs, identical for every backbone).
- ``nasfcos-fpn``: the published FPN with the plain FCOS head (mmdetection's 38.5 AP row).
- ``fcos``: ``fpn:standard+head:fcos``, the hand-made baseline built like torchvision's FCOS.

Named parts (``fpn:standard``, ``head:fcos``) are part of the grammar in :mod:`detector.arch.grammar`.
"""
from __future__ import annotations

from pathlib import Path

from detector.arch.grammar import Arch, ArchError, parse

NASFCOS_FPN = (
    "fpn:c5-c5-dcn-dcn-cat/c5-c5-dcn-dcn-cat/b0-c5-dcn-skip-cat/c3-c5-dcn-skip-cat"
    "/b1-c5-dcn-dcn-cat/b0-b3-dcn-dcn-cat/b3-c4-dcn-dcn-cat"
)
NASFCOS_HEAD = "head:s0-dcn-conv3-dcn-conv1-skip-skip"

ZOO: dict[str, str] = {
    "nasfcos": f"{NASFCOS_FPN}+{NASFCOS_HEAD}",
    "nasfcos-fpn": f"{NASFCOS_FPN}+head:fcos",
    "fcos": "fpn:standard+head:fcos",
}

BEST_FILE = "best.txt"


def zoo_arch(name: str) -> Arch:
    """The architecture registered under ``name``."""
    if name not in ZOO:
        raise ArchError(f"arch: '{name}' is not a zoo name; known: {', '.join(sorted(ZOO))}")
    return parse(ZOO[name])


def resolve_arch(value: str, num_blocks: int | None = None, num_head_layers: int | None = None) -> Arch:
    """Turn an ``arch=`` value into a code: a zoo name, a code, a file holding one, or a search run dir.

    A run directory resolves to the code in its ``best.txt``. Raises :class:`ArchError` with one
    line naming what was wrong.
    """
    value = str(value).strip() if value is not None else ""
    if value in ZOO:
        return zoo_arch(value)
    if value.startswith("fpn:"):
        return parse(value, num_blocks, num_head_layers)
    try:
        path = Path(value).expanduser()
        path.is_dir()
    except (OSError, RuntimeError, ValueError) as err:  # too long a name, '~nobody', a NUL byte
        reason = getattr(err, "strerror", None) or str(err)
        raise ArchError(f"arch: '{value[:80]}' is neither a zoo name, a code starting with 'fpn:', nor a "
                        f"usable path ({reason})") from None
    if value and path.is_dir():
        best = path / BEST_FILE
        if not best.is_file():
            raise ArchError(
                f"arch: directory '{value}' has no {BEST_FILE}; pass a finished search run directory"
            )
        return _parse_file(best, num_blocks, num_head_layers)
    if value and path.is_file():
        return _parse_file(path, num_blocks, num_head_layers)
    if not value:
        raise ArchError("arch: empty; give a zoo name (nasfcos, nasfcos-fpn, fcos), a code, a file or a run dir")
    raise ArchError(
        f"arch: '{value[:80]}' is neither a zoo name ({', '.join(sorted(ZOO))}), a code starting "
        "with 'fpn:', an existing file, nor a search run directory"
    )


def _parse_file(path: Path, num_blocks: int | None, num_head_layers: int | None) -> Arch:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ArchError(f"arch: cannot read '{path}': {err}") from None
    first = text.splitlines()[0].strip() if text else ""
    if first in ZOO:
        return zoo_arch(first)
    try:
        return parse(first, num_blocks, num_head_layers)
    except ArchError as err:
        raise ArchError(f"{err} (in file '{path}')") from None
