"""Architecture codes: the grammar, the value objects, one parser and one renderer.

An architecture code is plain, torch-free data. Its canonical text form uses only the characters
``a-z 0-9 : / + - .`` so that it passes unquoted through bash and Hydra overrides::

    arch   := fpn "+" head
    fpn    := "fpn:standard" | "fpn:" block ("/" block)*
    block  := in "-" in "-" fop "-" fop "-" agg
    in     := "c2" | "c3" | "c4" | "c5" | "b<k>"     (b<k> = output of earlier block k, 0-based)
    fop    := sep3 | sep3d3 | sep5d6 | skip | dcn
    agg    := sum | cat
    head   := "head:fcos" | "head:s<k>" ("-" hop)*  (k = number of leading per-level layers)
    hop    := conv1 | conv3 | sep3 | sep3d3 | skip | dcn

``parse(str(code)) == code`` always holds. Every malformed string raises :class:`ArchError`
(a ``ValueError``) whose message names the offending part, token and position, and how to fix it.

FPN semantics (DESIGN section 4): a block's output has the finer stride of its two inputs; block
outputs that no later block reads are *unused*; a valid FPN has at least three. The last three
unused blocks (in creation order) become P5, P4, P3 (the earliest of them is P5); every other
unused output is added into each of the three. :meth:`SearchedFPN.outputs` returns that plan.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from detector.errors import UserError

FPN_OPS = ("sep3", "sep3d3", "sep5d6", "skip", "dcn")
AGGREGATIONS = ("sum", "cat")
HEAD_OPS = ("conv1", "conv3", "sep3", "sep3d3", "skip", "dcn")
BACKBONE_LEVELS = ("c2", "c3", "c4", "c5")
LEVEL_STRIDES = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}

DEFAULT_FPN_BLOCKS = 7
DEFAULT_HEAD_LAYERS = 6
MIN_UNUSED_OUTPUTS = 3
MAX_CODE_LENGTH = 4096

_ALLOWED_CHARS = re.compile(r"[a-z0-9:/+\-.]*")
_BLOCK_REF = re.compile(r"b(0|[1-9][0-9]*)")
_SHARE = re.compile(r"s(0|[1-9][0-9]*)")


class ArchError(UserError):
    """A malformed or invalid architecture code. The message is one line meant for the user."""


@dataclass(frozen=True)
class FPNBlock:
    """One searched FPN block: two inputs, one unary op on each, then an aggregation."""

    inputs: tuple[str, str]
    ops: tuple[str, str]
    agg: str

    def __str__(self) -> str:
        return "-".join((*self.inputs, *self.ops, self.agg))


@dataclass(frozen=True)
class OutputPlan:
    """Which block outputs form P5, P4, P3 and which extra unused outputs are summed into each."""

    p5: int
    p4: int
    p3: int
    extras: tuple[int, ...]


@dataclass(frozen=True)
class StandardFPN:
    """The hand-made FPN of torchvision's FCOS (``fpn:standard``)."""

    def __str__(self) -> str:
        return "fpn:standard"


@dataclass(frozen=True)
class SearchedFPN:
    """A searched FPN: blocks in creation order. Validated on construction."""

    blocks: tuple[FPNBlock, ...]

    def __post_init__(self) -> None:
        _validate_blocks(self.blocks)

    def __str__(self) -> str:
        return "fpn:" + "/".join(str(b) for b in self.blocks)

    def levels_read(self) -> tuple[str, ...]:
        """Backbone levels (c2..c5) that some block reads, in level order."""
        read = {i for b in self.blocks for i in b.inputs if i in LEVEL_STRIDES}
        return tuple(level for level in BACKBONE_LEVELS if level in read)

    def unused(self) -> tuple[int, ...]:
        """Indices of blocks whose output no later block reads, in creation order."""
        return _unused_blocks(self.blocks)

    def outputs(self) -> OutputPlan:
        unused = self.unused()
        p5, p4, p3 = unused[-3:]
        return OutputPlan(p5=p5, p4=p4, p3=p3, extras=unused[:-3])

    def strides(self) -> tuple[int, ...]:
        """Output stride of each block: the finer of its two inputs' strides."""
        strides: list[int] = []
        for block in self.blocks:
            strides.append(min(_input_stride(i, strides) for i in block.inputs))
        return tuple(strides)


@dataclass(frozen=True)
class FCOSHead:
    """The hand-made FCOS head (``head:fcos``): four 3x3 conv layers per tower, shared by levels."""

    def __str__(self) -> str:
        return "head:fcos"


@dataclass(frozen=True)
class SearchedHead:
    """A searched head: ``share`` leading layers are per-level, the rest shared across levels."""

    share: int
    ops: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.ops:
            raise ArchError("head: no layers; write e.g. 'head:s0-conv3-conv3-conv3-conv3-conv3-conv3'")
        for pos, op in enumerate(self.ops):
            if op not in HEAD_OPS:
                raise ArchError(
                    f"head: layer {pos} op '{op}' is unknown; choose one of {', '.join(HEAD_OPS)}"
                )
        if not 0 <= self.share <= len(self.ops):
            raise ArchError(
                f"head: share index 's{self.share}' is out of range; use s0..s{len(self.ops)}"
            )

    def __str__(self) -> str:
        return "-".join((f"head:s{self.share}", *self.ops))


FPNPart = Union[StandardFPN, SearchedFPN]
HeadPart = Union[FCOSHead, SearchedHead]


@dataclass(frozen=True)
class Arch:
    """A whole decoder: FPN part + head part."""

    fpn: FPNPart
    head: HeadPart

    def __str__(self) -> str:
        return f"{self.fpn}+{self.head}"


def _input_stride(name: str, block_strides: list[int]) -> int:
    if name in LEVEL_STRIDES:
        return LEVEL_STRIDES[name]
    return block_strides[int(name[1:])]


def _unused_blocks(blocks: tuple[FPNBlock, ...]) -> tuple[int, ...]:
    read = {int(i[1:]) for b in blocks for i in b.inputs if i.startswith("b")}
    return tuple(k for k in range(len(blocks)) if k not in read)


def _validate_blocks(blocks: tuple[FPNBlock, ...]) -> None:
    if not blocks:
        raise ArchError("fpn: no blocks; write 'fpn:standard' or blocks like 'c5-c4-sep3-skip-sum'")
    for k, block in enumerate(blocks):
        if len(block.inputs) != 2 or len(block.ops) != 2:
            raise ArchError(f"fpn: block {k} needs exactly two inputs and two ops")
        for pos, name in enumerate(block.inputs):
            if name in LEVEL_STRIDES:
                continue
            match = _BLOCK_REF.fullmatch(name)
            if not match:
                raise ArchError(
                    f"fpn: block {k} input {pos} '{name}' is unknown; use c2..c5 or b<k> for an earlier block"
                )
            ref = int(match.group(1))
            if ref >= k:
                which = "itself" if ref == k else "a later block"
                raise ArchError(
                    f"fpn: block {k} input {pos} '{name}' refers to {which}; "
                    f"only b0..b{k - 1} exist there" if k else
                    f"fpn: block 0 input {pos} '{name}' refers to {which}; block 0 can only read c2..c5"
                )
        for pos, op in enumerate(block.ops):
            if op not in FPN_OPS:
                raise ArchError(
                    f"fpn: block {k} op {pos} '{op}' is unknown; choose one of {', '.join(FPN_OPS)}"
                )
        if block.agg not in AGGREGATIONS:
            raise ArchError(
                f"fpn: block {k} aggregation '{block.agg}' is unknown; choose one of {', '.join(AGGREGATIONS)}"
            )
    unused = _unused_blocks(blocks)
    if len(unused) < MIN_UNUSED_OUTPUTS:
        raise ArchError(
            f"fpn: only {len(unused)} block output(s) are unused ({', '.join(f'b{u}' for u in unused) or 'none'}); "
            f"at least {MIN_UNUSED_OUTPUTS} are needed to form P3-P5 - read fewer earlier blocks"
        )


def _parse_fpn(text: str, num_blocks: int | None) -> FPNPart:
    body = text[len("fpn:"):]
    if body == "standard":
        return StandardFPN()
    if not body:
        raise ArchError("fpn: nothing after 'fpn:'; write 'fpn:standard' or '/'-separated blocks")
    parts = body.split("/")
    blocks = []
    for k, part in enumerate(parts):
        if not part:
            raise ArchError(f"fpn: block {k} is empty (stray '/'); separate blocks with a single '/'")
        tokens = part.split("-")
        if len(tokens) != 5 or any(not t for t in tokens):
            raise ArchError(
                f"fpn: block {k} '{part}' must have 5 '-'-separated tokens: in-in-op-op-agg"
            )
        blocks.append(FPNBlock(inputs=(tokens[0], tokens[1]), ops=(tokens[2], tokens[3]), agg=tokens[4]))
    if num_blocks is not None and len(blocks) != num_blocks:
        raise ArchError(f"fpn: {len(blocks)} blocks given, this search space has {num_blocks}")
    return SearchedFPN(tuple(blocks))


def _parse_head(text: str, num_layers: int | None) -> HeadPart:
    body = text[len("head:"):]
    if body == "fcos":
        return FCOSHead()
    tokens = body.split("-")
    if any(not t for t in tokens):
        raise ArchError("head: empty token (stray '-'); write e.g. 'head:s0-conv3-dcn-skip-conv1-sep3-skip'")
    match = _SHARE.fullmatch(tokens[0])
    if not match:
        raise ArchError(
            f"head: first token '{tokens[0]}' must be the share index s<k> (or write 'head:fcos')"
        )
    ops = tuple(tokens[1:])
    if num_layers is not None and len(ops) != num_layers:
        raise ArchError(f"head: {len(ops)} layers given, this search space has {num_layers}")
    return SearchedHead(share=int(match.group(1)), ops=ops)


def parse(
    text: str,
    num_blocks: int | None = DEFAULT_FPN_BLOCKS,
    num_head_layers: int | None = DEFAULT_HEAD_LAYERS,
) -> Arch:
    """Parse a canonical code (no zoo names; see ``detector.arch.zoo.resolve_arch`` for those).

    ``num_blocks`` / ``num_head_layers`` fix the expected counts of searched parts (``None``
    accepts any count). Raises :class:`ArchError` for anything malformed or invalid.
    """
    if not isinstance(text, str):
        raise ArchError(f"arch: expected text, got {type(text).__name__}")
    if not text:
        raise ArchError("arch: empty code; give e.g. 'fpn:standard+head:fcos' or a zoo name like 'nasfcos'")
    if len(text) > MAX_CODE_LENGTH:
        raise ArchError(f"arch: code is {len(text)} characters long; at most {MAX_CODE_LENGTH} are allowed")
    if not text.isascii():
        bad = next(i for i, ch in enumerate(text) if not ch.isascii())
        raise ArchError(f"arch: non-ASCII character at position {bad}; codes use only a-z 0-9 : / + - .")
    if not _ALLOWED_CHARS.fullmatch(text):
        bad = next(i for i, ch in enumerate(text) if not _ALLOWED_CHARS.fullmatch(ch))
        raise ArchError(
            f"arch: character {text[bad]!r} at position {bad} is not allowed; codes use only a-z 0-9 : / + - ."
        )
    parts = text.split("+")
    if len(parts) != 2:
        raise ArchError(
            f"arch: expected one '+' between the fpn and head parts, found {len(parts) - 1}: "
            "write 'fpn:...+head:...'"
        )
    fpn_text, head_text = parts
    if not fpn_text.startswith("fpn:"):
        raise ArchError(f"arch: the part before '+' must start with 'fpn:', got '{fpn_text[:20]}'")
    if not head_text.startswith("head:"):
        raise ArchError(f"arch: the part after '+' must start with 'head:', got '{head_text[:20]}'")
    return Arch(fpn=_parse_fpn(fpn_text, num_blocks), head=_parse_head(head_text, num_head_layers))
