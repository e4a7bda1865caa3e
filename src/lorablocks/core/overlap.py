"""Overlap of LoRA deltas, computed from factors only (pure functions).

Frobenius inner product in factored form (scales folded into the factors):
``<B_i A_i, B_j A_j> = tr((B_i^T B_j)(A_j A_i^T))`` - two ``r x r`` Gram products, never an ``out x in``.
Per-module cosine ``cos_m = <dW_i, dW_j> / (|dW_i| |dW_j|)``. The RMS cosine of a pair is
``sqrt(mean_m cos_m^2)`` over the modules both adapters touch; of a set, over all pairs and their common
modules. The signed mean cosine is reported beside it (RMS hides whether deltas align or oppose).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from lorablocks.core.algebra import COMPUTE_DTYPE, LowRank, frobenius_norm, singular_values

__all__ = [
    "inner",
    "cosine",
    "PairOverlap",
    "SetOverlap",
    "pair_overlap",
    "set_overlap",
    "overlap_matrices",
    "effective_rank",
    "AdapterStats",
    "adapter_stats",
]


def inner(x: LowRank, y: LowRank) -> float:
    """Frobenius inner product ``<B_x A_x, B_y A_y>`` from factors."""
    bx, ax = x.B.to(COMPUTE_DTYPE), x.A.to(COMPUTE_DTYPE)
    by, ay = y.B.to(COMPUTE_DTYPE), y.A.to(COMPUTE_DTYPE)
    # tr((Bx^T By)(Ay Ax^T)) = sum((Bx^T By) * (Ax Ay^T))
    return float(torch.sum((bx.T @ by) * (ax @ ay.T)))


def cosine(x: LowRank, y: LowRank) -> float:
    """Cosine of two module deltas; ``nan`` when either is zero."""
    nx, ny = frobenius_norm(x), frobenius_norm(y)
    if nx == 0.0 or ny == 0.0:
        return math.nan
    return inner(x, y) / (nx * ny)


@dataclass
class PairOverlap:
    """Overlap of two adapters: per-module cosines and their RMS and signed mean."""

    cosines: dict[str, float]

    @property
    def modules(self) -> list[str]:
        return list(self.cosines)

    @property
    def rms_cosine(self) -> float:
        vals = [c for c in self.cosines.values() if not math.isnan(c)]
        return math.sqrt(sum(c * c for c in vals) / len(vals)) if vals else math.nan

    @property
    def mean_cosine(self) -> float:
        vals = [c for c in self.cosines.values() if not math.isnan(c)]
        return sum(vals) / len(vals) if vals else math.nan


def pair_overlap(a: Mapping[str, LowRank], b: Mapping[str, LowRank]) -> PairOverlap:
    """Per-module cosine over the modules both deltas touch (in ``a``'s order)."""
    return PairOverlap({m: cosine(a[m], b[m]) for m in a if m in b})


@dataclass
class SetOverlap:
    """Overlap of a set of adapters: every pair, and RMS / mean over all pairs and modules."""

    pairs: dict[tuple[int, int], PairOverlap] = field(default_factory=dict)

    def _values(self) -> list[float]:
        return [c for p in self.pairs.values() for c in p.cosines.values() if not math.isnan(c)]

    @property
    def rms_cosine(self) -> float:
        vals = self._values()
        return math.sqrt(sum(c * c for c in vals) / len(vals)) if vals else math.nan

    @property
    def mean_cosine(self) -> float:
        vals = self._values()
        return sum(vals) / len(vals) if vals else math.nan


def set_overlap(deltas: Sequence[Mapping[str, LowRank]]) -> SetOverlap:
    """Overlap of every pair ``i < j`` of ``deltas``."""
    out = SetOverlap()
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            out.pairs[(i, j)] = pair_overlap(deltas[i], deltas[j])
    return out


def overlap_matrices(deltas: Sequence[Mapping[str, LowRank]]) -> tuple[list[list[float]], list[list[float]], SetOverlap]:
    """``N x N`` RMS-cosine and mean-cosine matrices (diagonal 1) and the underlying pair overlaps.

    Norms are computed once per adapter module, not once per pair.
    """
    n = len(deltas)
    norms = [{m: frobenius_norm(x) for m, x in d.items()} for d in deltas]
    result = SetOverlap()
    for i in range(n):
        for j in range(i + 1, n):
            cos = {}
            for m, x in deltas[i].items():
                if m not in deltas[j]:
                    continue
                denom = norms[i][m] * norms[j][m]
                cos[m] = inner(x, deltas[j][m]) / denom if denom > 0 else math.nan
            result.pairs[(i, j)] = PairOverlap(cos)
    rms = [[1.0 if i == j else math.nan for j in range(n)] for i in range(n)]
    mean = [[1.0 if i == j else math.nan for j in range(n)] for i in range(n)]
    for (i, j), p in result.pairs.items():
        rms[i][j] = rms[j][i] = p.rms_cosine
        mean[i][j] = mean[j][i] = p.mean_cosine
    return rms, mean, result


def effective_rank(x: LowRank) -> float:
    """Entropy effective rank ``exp(-sum p_k log p_k)``, ``p_k = s_k / sum s`` (Roy & Vetterli, 2007)."""
    s = singular_values(x)
    s = s[s > 0]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


@dataclass
class AdapterStats:
    """Per-module Frobenius norm, stored rank and effective rank of one adapter."""

    norms: dict[str, float]
    ranks: dict[str, int]
    effective_ranks: dict[str, float]

    @property
    def total_norm(self) -> float:
        return math.sqrt(sum(v * v for v in self.norms.values()))


def adapter_stats(delta: Mapping[str, LowRank]) -> AdapterStats:
    return AdapterStats(
        norms={m: frobenius_norm(x) for m, x in delta.items()},
        ranks={m: x.rank for m, x in delta.items()},
        effective_ranks={m: effective_rank(x) for m, x in delta.items()},
    )
