"""The LSTM controller policy: one LSTM step per decision of a search space.

At step ``t`` the LSTM reads the embedding of the token chosen at step ``t - 1`` (a learned start
embedding at ``t = 0``) and a linear classifier for the kind of decision ``t`` (``input``,
``fpn_op``, ``agg``, ``share``, ``head_op``) turns its output into logits sized by
``space.max_choices()[kind]``.

Embeddings: one shared table where every *decision* owns its own rows (row = offset of the decision
+ token). Per-decision rows tell the LSTM which step it is at, so that the per-kind classifiers need
not infer the position by counting steps; they cost ``sum(num_choices) * hidden`` weights
(a few hundred rows for the default space).

Masking: a decision with fewer choices than its kind's classifier (input decisions of early blocks,
whose pool is still small) has its surplus logits set to ``-inf`` before the softmax, so an index
that does not exist yet has probability exactly 0 and can never be sampled.

Logit shaping, applied before masking, in this order: divide by ``temperature``, then squash as
``tanh_constant * tanh(logits / tanh_constant)`` (ENAS style: close to identity for small logits,
bounded by +-tanh_constant so that the policy cannot collapse too early).

Initialisation, from a caller-given generator (the global torch RNG is neither used nor advanced):
embeddings N(0, 1) (PyTorch's default for embeddings), every other parameter uniform(-0.1, 0.1)
(ENAS). Unit-scale embeddings give each step a distinct, strong input, so step-specific
preferences are quick to learn; with uniform(-0.1, 0.1) embeddings REINFORCE reached a markedly
lower reward on the toy task after 300 samples (see experiments/controller_study.md).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from detector.arch.space import SearchSpace

INIT_RANGE = 0.1


class ControllerPolicy(nn.Module):
    """Autoregressive distribution over the token sequences of ``space``.

    ``sample`` draws one sequence; ``log_prob`` scores many sequences at once (teacher forcing:
    the inputs of every step are known, so the whole batch goes through the LSTM in one call).
    Both use the same logits, so ``log_prob`` of a sampled sequence equals the value returned by
    ``sample`` up to float rounding.
    """

    def __init__(
        self,
        space: SearchSpace,
        hidden: int = 100,
        layers: int = 2,
        temperature: float | None = None,
        tanh_constant: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if hidden < 1 or layers < 1:
            raise ValueError(f"policy: hidden ({hidden}) and layers ({layers}) must be at least 1")
        if temperature is not None and temperature <= 0:
            raise ValueError(f"policy: temperature must be positive or None, got {temperature}")
        if tanh_constant is not None and tanh_constant <= 0:
            raise ValueError(f"policy: tanh_constant must be positive or None, got {tanh_constant}")
        self.space = space
        self.hidden = hidden
        self.layers = layers
        self.temperature = temperature
        self.tanh_constant = tanh_constant
        decisions = space.decisions
        self.num_steps = len(decisions)
        self.kinds = tuple(dict.fromkeys(d.kind for d in decisions))  # in first-use order
        self.kind_sizes = space.max_choices()
        self.max_choices = max(self.kind_sizes.values())
        self.step_kinds = tuple(d.kind for d in decisions)
        self.step_sizes = tuple(d.num_choices for d in decisions)

        # Row 0 is the start embedding; decision t owns rows offsets[t] .. offsets[t] + n_t - 1.
        offsets, row = [], 1
        for d in decisions:
            offsets.append(row)
            row += d.num_choices
        self.offsets_list = tuple(offsets)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        # (T, C_max): True where a choice index does not exist at that step.
        masked = torch.arange(self.max_choices)[None, :] >= torch.tensor(self.step_sizes)[:, None]
        self.register_buffer("masked", masked, persistent=False)
        self.kind_steps = {
            kind: torch.tensor([t for t, k in enumerate(self.step_kinds) if k == kind], dtype=torch.long)
            for kind in self.kinds
        }

        with torch.random.fork_rng(devices=[]):  # module constructors draw from the global RNG
            self.embedding = nn.Embedding(row, hidden)
            self.lstm = nn.LSTM(hidden, hidden, num_layers=layers, batch_first=True)
            self.classifiers = nn.ModuleDict(
                {kind: nn.Linear(hidden, self.kind_sizes[kind]) for kind in self.kinds}
            )
        with torch.no_grad():
            for param in self.parameters():
                param.uniform_(-INIT_RANGE, INIT_RANGE, generator=generator)
            self.embedding.weight.normal_(0.0, 1.0, generator=generator)

    # ------------------------------------------------------------------ logits
    def _shape(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature is not None:
            logits = logits / self.temperature
        if self.tanh_constant is not None:
            logits = self.tanh_constant * torch.tanh(logits / self.tanh_constant)
        return logits

    def step_log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-step log-probabilities of every choice given the previous tokens.

        ``tokens`` (N, T) long -> (N, T, C_max); masked choices hold ``-inf`` (probability 0).
        """
        n = tokens.shape[0]
        prev = self.offsets[:-1] + tokens[:, :-1]  # (N, T-1) embedding rows of the previous tokens
        start = torch.zeros(n, 1, dtype=torch.long, device=tokens.device)
        inputs = self.embedding(torch.cat([start, prev], dim=1))  # (N, T, H)
        out, _ = self.lstm(inputs)  # (N, T, H)
        logits = out.new_full((n, self.num_steps, self.max_choices), float("-inf"))
        for kind, steps in self.kind_steps.items():
            kind_logits = self._shape(self.classifiers[kind](out[:, steps]))  # (N, S_kind, C_kind)
            logits[:, steps, : kind_logits.shape[-1]] = kind_logits
        logits = logits.masked_fill(self.masked, float("-inf"))  # (N, T, C_max)
        return torch.log_softmax(logits, dim=-1)

    # ------------------------------------------------------------------ public API
    def log_prob(self, tokens: torch.Tensor | Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probability and summed per-step entropy of each sequence.

        ``tokens`` (N, T) long tensor or N token sequences -> two (N,) tensors (differentiable).
        """
        tokens = self.as_tensor(tokens)
        log_probs = self.step_log_probs(tokens)  # (N, T, C)
        chosen = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (N, T)
        return chosen.sum(dim=1), _entropy(log_probs).sum(dim=1)

    @torch.no_grad()
    def sample(self, generator: torch.Generator | None = None) -> tuple[tuple[int, ...], float, float]:
        """Draw one token sequence: (tokens, summed log-prob, summed entropy). Uses only ``generator``.

        The same maths as :meth:`step_log_probs`, run step by step in NumPy on a copy of the
        weights (per-step torch dispatch would cost more than the arithmetic). Each token is drawn
        by inverting the step's CDF with one uniform number from ``generator``; choices past the
        step's pool size are cut off, so they are never drawn.
        """
        weights = self._numpy_weights()
        hidden = self.hidden
        h = [np.zeros(hidden, np.float32) for _ in range(self.layers)]
        c = [np.zeros(hidden, np.float32) for _ in range(self.layers)]
        uniforms = torch.rand(self.num_steps, dtype=torch.float64, generator=generator).tolist()
        x = weights["embedding"][0]  # (H,) start embedding
        tokens: list[int] = []
        log_prob = entropy = 0.0
        for t in range(self.num_steps):
            for i, (w, b) in enumerate(weights["cells"]):
                gates = w @ np.concatenate([x, h[i]]) + b  # (4H,): input, forget, cell, output
                act = 0.5 + 0.5 * np.tanh(0.5 * gates)  # sigmoid, overflow-free
                c[i] = act[hidden: 2 * hidden] * c[i] + act[:hidden] * np.tanh(gates[2 * hidden: 3 * hidden])
                h[i] = x = act[3 * hidden:] * np.tanh(c[i])
            w, b = weights["classifiers"][self.step_kinds[t]]
            logits = self._shape_numpy(w @ x + b)[: self.step_sizes[t]].astype(np.float64)  # (n_t,)
            logits -= logits.max()
            step_lp = logits - math.log(np.exp(logits).sum())
            probs = np.exp(step_lp)
            token = min(int(np.searchsorted(np.cumsum(probs), uniforms[t] * probs.sum(), side="right")),
                        self.step_sizes[t] - 1)
            tokens.append(token)
            log_prob += float(step_lp[token])
            entropy -= float((probs * step_lp).sum())
            x = weights["embedding"][self.offsets_list[t] + token]
        return tuple(tokens), log_prob, entropy

    def _numpy_weights(self) -> dict:
        """Float32 NumPy views of the weights, laid out for :meth:`sample` (read-only use)."""
        lstm = self.lstm
        cells = []
        for i in range(self.layers):
            w = torch.cat([getattr(lstm, f"weight_ih_l{i}"), getattr(lstm, f"weight_hh_l{i}")], dim=1)  # (4H, 2H)
            b = getattr(lstm, f"bias_ih_l{i}") + getattr(lstm, f"bias_hh_l{i}")  # (4H,)
            cells.append((_to_numpy(w), _to_numpy(b)))
        classifiers = {k: (_to_numpy(m.weight), _to_numpy(m.bias)) for k, m in self.classifiers.items()}
        return {"embedding": _to_numpy(self.embedding.weight), "cells": cells, "classifiers": classifiers}

    def _shape_numpy(self, logits: np.ndarray) -> np.ndarray:
        if self.temperature is not None:
            logits = logits / np.float32(self.temperature)
        if self.tanh_constant is not None:
            logits = np.float32(self.tanh_constant) * np.tanh(logits / np.float32(self.tanh_constant))
        return logits

    def as_tensor(self, tokens: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """Token sequences as a (N, T) long tensor, checked against this policy's space."""
        if not isinstance(tokens, torch.Tensor):
            tokens = torch.tensor([list(seq) for seq in tokens], dtype=torch.long)
        if tokens.dim() != 2 or tokens.shape[1] != self.num_steps:
            raise ValueError(f"policy: expected tokens of shape (N, {self.num_steps}), got {tuple(tokens.shape)}")
        return tokens.long()


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).numpy()


def _entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy over the last dimension; masked (-inf) entries contribute 0, not NaN."""
    finite = torch.isfinite(log_probs)
    safe = torch.where(finite, log_probs, torch.zeros_like(log_probs))
    return -(safe.exp() * safe * finite).sum(dim=-1)
