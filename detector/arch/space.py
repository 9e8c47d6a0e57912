"""The search space: an ordered list of decisions, and tokens <-> architecture codes.

Torch-free. A *token sequence* is a tuple of ints, one per decision, in decision order:

- FPN, per block k: ``input`` (x1), ``input`` (x2), ``fpn_op`` (op1), ``fpn_op`` (op2), ``agg``.
  Input decisions of block k choose among the pool at that point: the backbone levels, then the
  outputs b0..b{k-1}, so their choice count is ``len(levels) + k``.
- Head: ``share`` (k in 0..layers), then one ``head_op`` per layer.

Stages restrict the space: ``fpn`` searches the FPN with the head fixed (``head:fcos`` unless
given), ``head`` searches the head with the FPN fixed, ``joint`` searches both.
A token sequence is *valid* when its FPN leaves at least three block outputs unused.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

from detector.arch.grammar import (
    AGGREGATIONS,
    BACKBONE_LEVELS,
    DEFAULT_FPN_BLOCKS,
    DEFAULT_HEAD_LAYERS,
    FPN_OPS,
    HEAD_OPS,
    MIN_UNUSED_OUTPUTS,
    Arch,
    ArchError,
    FCOSHead,
    FPNBlock,
    FPNPart,
    HeadPart,
    SearchedFPN,
    SearchedHead,
    StandardFPN,
)

STAGES = ("fpn", "head", "joint")
MAX_SPACE_DEPTH = 64  # FPN blocks and head layers; a 64-block code is still within MAX_CODE_LENGTH
DECISION_KINDS = ("input", "fpn_op", "agg", "share", "head_op")


@dataclass(frozen=True)
class Decision:
    """One controller step: its name (e.g. ``fpn.b3.in1``), kind, and the labels of its choices."""

    name: str
    kind: str
    choices: tuple[str, ...]

    @property
    def num_choices(self) -> int:
        return len(self.choices)


class SearchSpace:
    """Decisions of one search stage and the mapping between token sequences and codes."""

    def __init__(
        self,
        stage: str = "joint",
        levels: Sequence[str] = ("c3", "c4", "c5"),
        num_blocks: int = DEFAULT_FPN_BLOCKS,
        fpn_ops: Sequence[str] = FPN_OPS,
        aggregations: Sequence[str] = AGGREGATIONS,
        num_head_layers: int = DEFAULT_HEAD_LAYERS,
        head_ops: Sequence[str] = HEAD_OPS,
        fixed_fpn: FPNPart | None = None,
        fixed_head: HeadPart | None = None,
    ) -> None:
        if stage not in STAGES:
            raise ArchError(f"search.stages: unknown stage '{stage}'; choose from {', '.join(STAGES)}")
        bad = [name for name in levels if name not in BACKBONE_LEVELS]
        if bad or not levels:
            raise ArchError(f"space.levels: {bad or 'empty'} invalid; use a subset of {', '.join(BACKBONE_LEVELS)}")
        for label, ops, table in (("fpn_ops", fpn_ops, FPN_OPS), ("head_ops", head_ops, HEAD_OPS),
                                  ("aggregations", aggregations, AGGREGATIONS)):
            unknown = [op for op in ops if op not in table]
            if unknown or not ops:
                raise ArchError(f"space.{label}: {unknown or 'empty'} invalid; choose from {', '.join(table)}")
        if num_blocks < MIN_UNUSED_OUTPUTS:
            raise ArchError(f"space.num_blocks: {num_blocks} is too few; at least {MIN_UNUSED_OUTPUTS} are needed")
        if num_head_layers < 1:
            raise ArchError("space.num_head_layers: must be at least 1")
        if max(num_blocks, num_head_layers) > MAX_SPACE_DEPTH:  # the decision lists grow with them
            raise ArchError(f"space: num_blocks={num_blocks}, num_head_layers={num_head_layers}; at most "
                            f"{MAX_SPACE_DEPTH} each")
        if stage == "head" and fixed_fpn is None:
            raise ArchError("search: the head stage needs a fixed FPN (the FPN stage's best or a given code)")
        self.stage = stage
        self.levels = tuple(sorted(levels, key=BACKBONE_LEVELS.index))
        self.num_blocks = num_blocks
        self.fpn_ops = tuple(fpn_ops)
        self.aggregations = tuple(aggregations)
        self.num_head_layers = num_head_layers
        self.head_ops = tuple(head_ops)
        self.fixed_fpn = fixed_fpn
        self.fixed_head = fixed_head if fixed_head is not None else FCOSHead()
        self.decisions = tuple(self._fpn_decisions() + self._head_decisions())

    # ------------------------------------------------------------------ structure
    @property
    def searches_fpn(self) -> bool:
        return self.stage in ("fpn", "joint")

    @property
    def searches_head(self) -> bool:
        return self.stage in ("head", "joint")

    def _fpn_decisions(self) -> list[Decision]:
        if not self.searches_fpn:
            return []
        out = []
        for k in range(self.num_blocks):
            pool = self.levels + tuple(f"b{j}" for j in range(k))
            out += [
                Decision(f"fpn.b{k}.in1", "input", pool),
                Decision(f"fpn.b{k}.in2", "input", pool),
                Decision(f"fpn.b{k}.op1", "fpn_op", self.fpn_ops),
                Decision(f"fpn.b{k}.op2", "fpn_op", self.fpn_ops),
                Decision(f"fpn.b{k}.agg", "agg", self.aggregations),
            ]
        return out

    def _head_decisions(self) -> list[Decision]:
        if not self.searches_head:
            return []
        shares = tuple(f"s{k}" for k in range(self.num_head_layers + 1))
        return [Decision("head.share", "share", shares)] + [
            Decision(f"head.op{i}", "head_op", self.head_ops) for i in range(self.num_head_layers)
        ]

    def max_choices(self) -> dict[str, int]:
        """Largest choice count per decision kind present (classifier sizes for a policy)."""
        sizes: dict[str, int] = {}
        for d in self.decisions:
            sizes[d.kind] = max(sizes.get(d.kind, 0), d.num_choices)
        return sizes

    # ------------------------------------------------------------------ tokens <-> codes
    def decode(self, tokens: Sequence[int]) -> Arch:
        """The architecture for a token sequence. Raises :class:`ArchError` if invalid."""
        tokens = tuple(int(t) for t in tokens)
        if len(tokens) != len(self.decisions):
            raise ArchError(f"tokens: {len(tokens)} given, this space has {len(self.decisions)} decisions")
        for pos, (tok, d) in enumerate(zip(tokens, self.decisions)):
            if not 0 <= tok < d.num_choices:
                raise ArchError(f"tokens: position {pos} ({d.name}) is {tok}; expected 0..{d.num_choices - 1}")
        labels = [d.choices[t] for d, t in zip(self.decisions, tokens)]
        fpn: FPNPart | None = self.fixed_fpn
        if self.searches_fpn:
            fpn_labels, labels = labels[: 5 * self.num_blocks], labels[5 * self.num_blocks:]
            blocks = tuple(
                FPNBlock(inputs=(g[0], g[1]), ops=(g[2], g[3]), agg=g[4])
                for g in (fpn_labels[i: i + 5] for i in range(0, len(fpn_labels), 5))
            )
            fpn = SearchedFPN(blocks)
        head: HeadPart = self.fixed_head
        if self.searches_head:
            head = SearchedHead(share=int(labels[0][1:]), ops=tuple(labels[1:]))
        assert fpn is not None
        return Arch(fpn=fpn, head=head)

    def encode(self, arch: Arch) -> tuple[int, ...]:
        """The token sequence of ``arch`` in this space. Raises :class:`ArchError` if it is not in it."""
        labels: list[str] = []
        if self.searches_fpn:
            if not isinstance(arch.fpn, SearchedFPN) or len(arch.fpn.blocks) != self.num_blocks:
                raise ArchError(f"arch: fpn '{arch.fpn}' is not a {self.num_blocks}-block searched FPN of this space")
            for block in arch.fpn.blocks:
                labels += [*block.inputs, *block.ops, block.agg]
        elif arch.fpn != self.fixed_fpn:
            raise ArchError(f"arch: fpn differs from the fixed FPN of the '{self.stage}' stage")
        if self.searches_head:
            if not isinstance(arch.head, SearchedHead) or len(arch.head.ops) != self.num_head_layers:
                raise ArchError(f"arch: head '{arch.head}' is not a {self.num_head_layers}-layer searched head")
            labels += [f"s{arch.head.share}", *arch.head.ops]
        elif arch.head != self.fixed_head:
            raise ArchError(f"arch: head differs from the fixed head of the '{self.stage}' stage")
        tokens = []
        for d, label in zip(self.decisions, labels):
            if label not in d.choices:
                raise ArchError(f"arch: {d.name} '{label}' is not in this space; choose from {', '.join(d.choices)}")
            tokens.append(d.choices.index(label))
        return tuple(tokens)

    def is_valid(self, tokens: Sequence[int]) -> bool:
        try:
            self.decode(tokens)
        except ArchError:
            return False
        return True

    # ------------------------------------------------------------------ sampling
    def sample_tokens(self, rng: random.Random) -> tuple[int, ...]:
        """Uniformly sample a *valid* token sequence (rejection sampling; seeded by ``rng``)."""
        while True:
            tokens = tuple(rng.randrange(d.num_choices) for d in self.decisions)
            if self.is_valid(tokens):
                return tokens

    def sample(self, rng: random.Random) -> Arch:
        return self.decode(self.sample_tokens(rng))

    def mutate(self, tokens: Sequence[int], rng: random.Random) -> tuple[int, ...]:
        """Change exactly one decision to a different choice, keeping the result valid."""
        tokens = tuple(tokens)
        mutable = [i for i, d in enumerate(self.decisions) if d.num_choices > 1]
        if not mutable:
            return tokens
        while True:
            pos = rng.choice(mutable)
            new = rng.randrange(self.decisions[pos].num_choices - 1)
            new += new >= tokens[pos]  # skip the current value
            child = tokens[:pos] + (new,) + tokens[pos + 1:]
            if self.is_valid(child):
                return child

    # ------------------------------------------------------------------ size
    def total_size(self) -> int:
        """Number of token sequences, valid or not."""
        return math.prod(d.num_choices for d in self.decisions)

    def size(self) -> int:
        """Exact number of valid architectures in this stage's space."""
        head = math.prod(d.num_choices for d in self._head_decisions()) if self.searches_head else 1
        return self._valid_fpn_count() * head

    def _valid_fpn_count(self) -> int:
        if not self.searches_fpn:
            return 1
        # Dynamic programme over blocks; state = bitmask of blocks read so far.
        n_levels, per_block_ops = len(self.levels), len(self.fpn_ops) ** 2 * len(self.aggregations)
        counts = {0: 1}
        for k in range(self.num_blocks):
            pool = n_levels + k
            nxt: dict[int, int] = {}
            for mask, count in counts.items():
                for x1 in range(pool):
                    for x2 in range(pool):
                        new = mask
                        for x in (x1, x2):
                            if x >= n_levels:
                                new |= 1 << (x - n_levels)
                        nxt[new] = nxt.get(new, 0) + count * per_block_ops
            counts = nxt
        return sum(c for mask, c in counts.items()
                   if self.num_blocks - bin(mask).count("1") >= MIN_UNUSED_OUTPUTS)


def space_from_cfg(cfg: Any, stage: str, fixed_fpn: FPNPart | None = None,
                   fixed_head: HeadPart | None = None) -> SearchSpace:
    """Build a stage's space from the ``space`` config group (keys mirror the constructor)."""
    return SearchSpace(
        stage=stage,
        levels=tuple(cfg.levels),
        num_blocks=int(cfg.num_blocks),
        fpn_ops=tuple(cfg.fpn_ops),
        aggregations=tuple(cfg.aggregations),
        num_head_layers=int(cfg.num_head_layers),
        head_ops=tuple(cfg.head_ops),
        fixed_fpn=fixed_fpn,
        fixed_head=fixed_head,
    )


__all__ = ["Decision", "SearchSpace", "space_from_cfg", "STAGES", "DECISION_KINDS", "StandardFPN"]
