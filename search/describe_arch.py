"""Human-readable description of an architecture code (torch-free): what `search show` prints."""
from __future__ import annotations

from detector.arch.grammar import LEVEL_STRIDES, Arch, FCOSHead, SearchedFPN, SearchedHead, StandardFPN

P_TARGET_LEVEL = {"P5": "c5", "P4": "c4", "P3": "c3"}


def fpn_lines(fpn) -> list[str]:
    if isinstance(fpn, StandardFPN):
        return [
            "FPN  fpn:standard (torchvision FCOS FPN)",
            "  P3, P4, P5 = lateral 1x1 + top-down sum + 3x3 on C3, C4, C5 (strides 8, 16, 32)",
            "  P6 = 3x3 stride-2 conv on P5; P7 = 3x3 stride-2 conv on ReLU(P6)",
        ]
    assert isinstance(fpn, SearchedFPN)
    strides = fpn.strides()
    plan = fpn.outputs()
    unused = set(fpn.unused())
    lines = [f"FPN  {len(fpn.blocks)} searched blocks (pool: backbone levels, then block outputs)"]
    for k, (block, stride) in enumerate(zip(fpn.blocks, strides)):
        ins = ", ".join(
            f"{name}({op}) s{LEVEL_STRIDES[name] if name in LEVEL_STRIDES else strides[int(name[1:])]}"
            for name, op in zip(block.inputs, block.ops)
        )
        tag = "  unused" if k in unused else ""
        lines.append(f"  b{k}: {block.agg}[{ins}] -> stride {stride}{tag}")
    extras = "".join(f" + b{e}" for e in plan.extras)
    for name, k in (("P5", plan.p5), ("P4", plan.p4), ("P3", plan.p3)):
        target = LEVEL_STRIDES[P_TARGET_LEVEL[name]]
        resize = "" if strides[k] == target else f", resized to stride {target}"
        lines.append(f"  {name} = b{k}{extras} (computed at stride {strides[k]}{resize})")
    if plan.extras:
        lines.append(f"  extra unused outputs summed into P3-P5: {', '.join(f'b{e}' for e in plan.extras)}")
    lines.append("  P6 = 3x3 stride-2 conv on P5; P7 = 3x3 stride-2 conv on ReLU(P6)")
    n_dcn = sum(op == "dcn" for b in fpn.blocks for op in b.ops)
    lines.append(f"  deformable convolutions: {n_dcn}")
    return lines


def head_lines(head) -> list[str]:
    if isinstance(head, FCOSHead):
        return [
            "HEAD head:fcos (torchvision FCOS head)",
            "  cls and reg towers: 4 x (3x3 conv + GroupNorm + ReLU), shared across levels",
        ]
    assert isinstance(head, SearchedHead)
    lines = [f"HEAD {len(head.ops)} layers per tower (cls and reg, separate weights), GroupNorm + ReLU"]
    for i, op in enumerate(head.ops):
        scope = "per level" if i < head.share else "shared across levels"
        lines.append(f"  layer {i}: {op:<7} {scope}")
    lines.append("  predictors: 3x3 cls logits, 3x3 box distances exp(scale * x), 3x3 centerness (cls tower)")
    return lines


def describe_arch(arch: Arch, name: str | None = None) -> str:
    title = f"arch {name} = {arch}" if name else f"arch {arch}"
    return "\n".join([title, *fpn_lines(arch.fpn), *head_lines(arch.head)])
