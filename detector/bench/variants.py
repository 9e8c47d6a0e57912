"""Which rows a bench run measures: torchvision's, ours per DCN kernel and CUDA-graph mode, the
``also_arch`` rows and the cumulative fast-path ablation."""
from __future__ import annotations

from typing import Any


from detector.arch.grammar import Arch
from detector.model.deform import DEFORM_IMPLS
from detector.fast.switch import COMPILE_PARTS, FAST_PATHS, parse_paths
from detector.arch.zoo import resolve_arch
from detector.bench.settings import TORCHVISION_BACKBONES, TORCHVISION_LAYOUTS, BenchError, BenchSettings, Variant


GRAPH_MODES = {"false": (False,), "true": (True,), "both": (False, True)}


def parse_graph_modes(value: Any) -> tuple[bool, ...]:
    """``bench.cuda_graph``: false | true | both -> the cuda_graph settings of ours' rows."""
    text = str(value).strip().lower()
    if text not in GRAPH_MODES:
        raise BenchError(f"bench.cuda_graph={value!r}: use false, true or both (eager and graphed rows)")
    return GRAPH_MODES[text]


def cumulative_ablation(deform_impl: str) -> list[Variant]:
    """Ours with the fast paths added one at a time (reference first), for the change log."""
    steps = [("reference", ()), ("+losses+points", ("losses", "points")),
             ("+frozen_bn", ("losses", "points", "frozen_bn")),
             ("+group_norm", ("losses", "points", "frozen_bn", "group_norm")),
             ("+postprocess", ("losses", "points", "frozen_bn", "group_norm", "postprocess")),
             ("+resize+cat_reduce", ("losses", "points", "frozen_bn", "group_norm", "postprocess", "resize",
                                     "cat_reduce")),
             ("+cuda_graphs (all)", FAST_PATHS)]
    suffix = "" if deform_impl == "torchvision" else f" (dcn={deform_impl})"
    return [Variant(name=f"ours {label}{suffix}", fast_paths=tuple(paths), deform_impl=deform_impl)
            for label, paths in steps]


def default_variants(arch: Arch, fast_paths: str | tuple[str, ...] = FAST_PATHS,
                     deform_impls: tuple[str, ...] = ("fast",), compile_: tuple[str, ...] = (),
                     torchvision_layouts: tuple[str, ...] = ("frozen_bn",), ablate: bool = False,
                     cuda_graph: Any = "false", also_arch: str | None = None) -> list[Variant]:
    """torchvision first (one row per layout; ``none`` for no reference), then ours once per DCN
    kernel (once when the arch has no DCN) and per ``cuda_graph`` mode (false | true | both: eager,
    graphed training step, or both), then the same for ``also_arch`` (None: none), then the ablation."""
    bad = [layout for layout in torchvision_layouts if layout not in TORCHVISION_LAYOUTS]
    if bad:
        raise BenchError(f"bench.torchvision={list(torchvision_layouts)}: choose among {', '.join(TORCHVISION_LAYOUTS)}")
    unknown_impls = [impl for impl in deform_impls if impl not in DEFORM_IMPLS]
    if unknown_impls:
        raise BenchError(f"bench.deform_impl={list(deform_impls)}: choose among {', '.join(DEFORM_IMPLS)}")
    paths = parse_paths(fast_paths)
    compile_ = parse_paths(compile_, COMPILE_PARTS, "compile part")
    graph_modes = parse_graph_modes(cuda_graph)
    impls_wanted = tuple(dict.fromkeys(deform_impls))
    variants = []
    for layout in dict.fromkeys(torchvision_layouts):
        if layout != "none":
            variants.append(Variant(name=f"torchvision fcos ({layout})", model="torchvision", torchvision_layout=layout))
    variants += _ours_rows(arch, None, paths, impls_wanted, compile_, graph_modes)
    if also_arch is not None:
        variants += _ours_rows(resolve_arch(also_arch), also_arch, paths, impls_wanted, compile_, graph_modes)
    if ablate:
        variants += cumulative_ablation(impls_wanted[0] if "dcn" in str(arch) else "torchvision")
    return variants


def _ours_rows(arch: Arch, arch_name: str | None, paths: tuple[str, ...], deform_impls: tuple[str, ...],
               compile_: tuple[str, ...], graph_modes: tuple[bool, ...]) -> list[Variant]:
    """Ours once per DCN kernel (once without DCN ops) and graph mode; ``arch_name`` None: the bench's arch."""
    has_dcn = "dcn" in str(arch)
    impls = deform_impls if has_dcn else ("torchvision",)
    label = "all fast paths" if set(paths) == set(FAST_PATHS) else (",".join(paths) or "reference")
    compiled = f", compile={'+'.join(compile_)}" if compile_ else ""
    prefix = "ours" if arch_name is None else f"ours {arch_name}"
    rows = []
    for impl in impls:
        suffix = f", dcn={impl}" if has_dcn else ""
        for graphed in graph_modes:
            graph = ", train graph" if graphed else ""
            # with both modes the graphed row skips inference: the training graph changes training only
            rows.append(Variant(name=f"{prefix} ({label}{suffix}{compiled}{graph})", fast_paths=paths,
                                deform_impl=impl, compile=tuple(compile_), cuda_graph=graphed, arch=arch_name,
                                infer=not (graphed and False in graph_modes)))
    return rows


def check_variants(settings: BenchSettings, variants: list[Variant]) -> None:
    """BenchError before anything is measured when a row cannot be built with these settings."""
    for variant in variants:
        if variant.model != "torchvision":
            continue
        if settings.backbone not in TORCHVISION_BACKBONES:
            raise BenchError(f"bench: the torchvision reference needs a ResNet backbone "
                             f"({', '.join(TORCHVISION_BACKBONES)}), got {settings.backbone}; pass bench.torchvision=none")
