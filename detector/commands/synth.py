"""``python -m detector synth out=<dir>``: write the synthetic COCO-format dataset
(:mod:`detector.data.synthetic`) into a new folder."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from detector.data.errors import DataError
from detector.data.shapes import CLASS_NAMES
from detector.data.synthetic import spec_from_config, write_atomically
from detector.output_path import output_folder, write_error


def synth_command(cfg: Mapping[str, Any] | Any) -> Path:
    """``python -m detector synth out=<dir>``: write the synthetic dataset of ``cfg.data`` to ``cfg.out``.

    Refuses (DataError) when ``out`` is unset, or exists and is not an empty folder: it never
    overwrites user data.
    """
    out = cfg.get("out", None)
    if out is None or str(out).strip() == "":
        raise DataError("synth needs an output folder: pass out=<dir>")
    out = Path(str(out)).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"out={out} exists and is not empty; synth never overwrites, pass a new folder")
    output_folder(out, "out", [])  # a folder that can be written
    cfg_data = cfg.get("data", None) or {}
    name = cfg_data.get("name", "synthetic")
    if name != "synthetic":
        raise DataError(f"synth writes the synthetic dataset, but data={name}; drop the data= override")
    spec = spec_from_config(cfg_data)
    if out.exists():
        out.rmdir()  # empty: replaced by the atomic rename below
    try:
        write_atomically(spec, out, workers=min(2, os.cpu_count() or 1), progress=True)
    except OSError as err:
        raise write_error(out, "out", err) from None
    print(f"wrote {spec.num_train} train and {spec.num_val} val images ({len(CLASS_NAMES)} classes) to {out}")
    return out
