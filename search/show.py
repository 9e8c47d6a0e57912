"""`python -m search show arch=<code>` and `python -m search sample n=<k> seed=<s>`."""
from __future__ import annotations

import random
import re

from detector.errors import UserError
from detector.output_path import output_file, write_error
from detector.arch.zoo import ZOO, resolve_arch
from search.describe_arch import describe_arch
from search.diagram import draw_arch, is_diagram
from detector.arch.space import space_from_cfg


def _diagram_name(arch_value: str) -> str:
    if arch_value in ZOO:
        return f"{arch_value}.png"
    return "arch-" + re.sub(r"[^a-z0-9]+", "-", arch_value.lower())[:40].strip("-") + ".png"


def show_command(cfg) -> None:
    """Print the decoded architecture, whether this search space holds it, and write its diagram."""
    if cfg.arch is None:
        raise UserError("show: give arch=<code|zoo name|file|run dir>, e.g. arch=nasfcos")
    value = str(cfg.arch)
    arch = resolve_arch(value)
    out = output_file(cfg.out if cfg.out else _diagram_name(value), "out", (".png",), owned=is_diagram)
    print(describe_arch(arch, name=value if value in ZOO else None))
    stage = {(True, True): "joint", (True, False): "fpn", (False, True): "head"}.get(
        (not str(arch.fpn).endswith("standard"), not str(arch.head).endswith("fcos")))
    if stage:
        try:
            space_from_cfg(cfg.space, "joint" if stage == "joint" else stage,
                           fixed_fpn=arch.fpn if stage == "head" else None,
                           fixed_head=arch.head if stage == "fpn" else None).encode(arch)
            print(f"valid: yes (in the configured '{stage}' search space)")
        except UserError as err:
            print(f"valid: as a code, but outside the configured search space: {err}")
    else:
        print("valid: yes (hand-made architecture, outside the search space)")
    try:
        draw_arch(arch, out, title=value if value in ZOO else "")
    except OSError as err:
        raise write_error(out, "out", err) from None
    print(f"diagram: {out}")


def sample_command(cfg) -> None:
    """Print ``n`` random valid joint-space codes, one per line (seeded)."""
    n = int(cfg.n)
    if n < 0:
        raise UserError(f"sample: n={n} must be >= 0")
    space = space_from_cfg(cfg.space, "joint")
    rng = random.Random(int(cfg.seed))
    for _ in range(n):
        print(space.sample(rng))
