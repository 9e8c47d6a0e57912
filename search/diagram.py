"""Diagram PNG of an architecture: the FPN block graph (left) and the head chain (right)."""
from __future__ import annotations

from pathlib import Path

from detector.arch.grammar import Arch, SearchedFPN, SearchedHead

_LEVEL_COLOR = "#cfe2f3"
_BLOCK_COLOR = "#fff2cc"
_OUTPUT_COLOR = "#d9ead3"
_SHARED_COLOR = "#ead1dc"
DIAGRAM_MARK = "nasfcos architecture diagram"  # PNG "Software" text: a file this module wrote


def _box(ax, x: float, y: float, text: str, color: str, width: float = 1.6, height: float = 0.55) -> None:
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x - width / 2, y - height / 2), width, height,
                                boxstyle="round,pad=0.03", fc=color, ec="#444444", lw=0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=7)


def _arrow(ax, start: tuple[float, float], end: tuple[float, float], label: str = "") -> None:
    ax.annotate("", xy=end, xytext=start,
                arrowprops=dict(arrowstyle="->", lw=0.7, color="#555555", shrinkA=8, shrinkB=8))
    if label:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2, label, fontsize=5.5, color="#aa3333",
                ha="center", va="center", bbox=dict(fc="white", ec="none", pad=0.2))


def _draw_fpn(ax, fpn) -> None:
    ax.set_title("FPN", fontsize=9)
    ax.axis("off")
    if not isinstance(fpn, SearchedFPN):
        _box(ax, 0, 0, "fpn:standard\n(torchvision FPN)", _BLOCK_COLOR, width=3, height=1)
        ax.set_xlim(-3, 3)
        ax.set_ylim(-2, 2)
        return
    levels = [lvl for lvl in ("c2", "c3", "c4", "c5") if lvl in fpn.levels_read()] or ["c3", "c4", "c5"]
    pos: dict[str, tuple[float, float]] = {}
    for i, level in enumerate(levels):
        pos[level] = (i * 2.2, 0.0)
        _box(ax, *pos[level], level.upper(), _LEVEL_COLOR)
    strides = fpn.strides()
    plan = fpn.outputs()
    names = {plan.p5: "P5", plan.p4: "P4", plan.p3: "P3"}
    for k, block in enumerate(fpn.blocks):
        xy = (((k % 3) - 0.5) * 2.4 + 1.0, -1.4 * (k + 1))
        pos[f"b{k}"] = xy
        for name, op in zip(block.inputs, block.ops):
            _arrow(ax, pos[name], xy, op)
        color = _OUTPUT_COLOR if k in names else _BLOCK_COLOR
        extra = f" -> {names[k]}" if k in names else (" (extra)" if k in plan.extras else "")
        _box(ax, *xy, f"b{k} {block.agg} s{strides[k]}{extra}", color, width=2.0)
    ax.set_xlim(-2, 7.5)
    ax.set_ylim(-1.4 * (len(fpn.blocks) + 1), 1)


def _draw_head(ax, head) -> None:
    ax.set_title("Head (each tower)", fontsize=9)
    ax.axis("off")
    if not isinstance(head, SearchedHead):
        _box(ax, 0, 0, "head:fcos\n4 x conv3 + GN + ReLU", _SHARED_COLOR, width=3, height=1)
        ax.set_xlim(-2, 2)
        ax.set_ylim(-2, 2)
        return
    for i, op in enumerate(head.ops):
        per_level = i < head.share
        color = _LEVEL_COLOR if per_level else _SHARED_COLOR
        _box(ax, 0, -i * 1.0, f"{i}: {op} ({'per level' if per_level else 'shared'})", color, width=2.6)
        if i:
            _arrow(ax, (0, -(i - 1) * 1.0), (0, -i * 1.0))
    ax.set_xlim(-2, 2)
    ax.set_ylim(-len(head.ops), 1)


def is_diagram(path: str | Path) -> bool:
    """Whether ``path`` is a PNG that :func:`draw_arch` wrote (so it may be redrawn)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get("Software") == DIAGRAM_MARK
    except (OSError, ValueError, SyntaxError):
        return False


def draw_arch(arch: Arch, path: str | Path, title: str = "") -> Path:
    """Write the diagram of ``arch`` to ``path`` (PNG, marked as ours: :func:`is_diagram`) and
    return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_fpn, ax_head) = plt.subplots(1, 2, figsize=(10, 7), gridspec_kw={"width_ratios": [2.2, 1]})
    _draw_fpn(ax_fpn, arch.fpn)
    _draw_head(ax_head, arch.head)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png", metadata={"Software": DIAGRAM_MARK})
    plt.close(fig)
    return path
