"""Function overlap of LoRA deltas: how strongly block ``j`` acts on the inputs of domain ``i`` (pure).

With ``X_i^m`` the inputs module ``m`` sees on a few examples of domain ``i`` (tokens as columns),
the interference of block ``j`` on domain ``i`` is (COMPOSITION.md, after OSRM, arXiv 2505.22934)

    I(j -> i) = sum_m |dW_j^m X_i^m|_F^2 / sum_m |dW_i^m X_i^m|_F^2

and the functional cosine on domain ``i``'s inputs is
``sum_m <dW_i^m X_i^m, dW_j^m X_i^m> / sqrt(sum_m |dW_i^m X_i^m|^2 sum_m |dW_j^m X_i^m|^2)``.

Everything is factored: with the blocks' ``A`` factors stacked, ``A^m = [A_1; ...; A_n]`` (``R x in``),
the inputs enter only through the small **projected Gram** ``K^m = (A^m X)(A^m X)^T`` (``R x R``), and
``<dW_j X, dW_k X> = tr((B_j^T B_k) K^m[k, j])`` where ``K[k, j]`` is the ``(r_k x r_j)`` block.
No ``out x in`` or ``in x in`` matrix is ever formed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from lorablocks.core.algebra import COMPUTE_DTYPE, LowRank

__all__ = ["stacked_A", "block_slices", "FunctionOverlap", "function_overlap"]


def block_slices(deltas: Sequence[Mapping[str, LowRank]], module: str) -> list[slice | None]:
    """Where each block's rows sit in the stacked ``A`` of ``module`` (``None``: the block lacks it)."""
    out, start = [], 0
    for d in deltas:
        if module in d:
            out.append(slice(start, start + d[module].rank))
            start += d[module].rank
        else:
            out.append(None)
    return out


def stacked_A(deltas: Sequence[Mapping[str, LowRank]], module: str) -> torch.Tensor:
    """``[A_1; ...; A_n]`` of the blocks that touch ``module`` (``R x in``, float64)."""
    return torch.cat([d[module].A.to(COMPUTE_DTYPE) for d in deltas if module in d], dim=0)


def _pair_energy(deltas: Sequence[Mapping[str, LowRank]], K: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``E[j, k] = sum_m <dW_j^m X, dW_k^m X>`` over the modules in ``K`` (``n x n``, float64)."""
    n = len(deltas)
    E = torch.zeros(n, n, dtype=COMPUTE_DTYPE)
    for module, gram in K.items():
        where = block_slices(deltas, module)
        for j in range(n):
            for k in range(j, n):
                if where[j] is None or where[k] is None:
                    continue
                Bj, Bk = deltas[j][module].B.to(COMPUTE_DTYPE), deltas[k][module].B.to(COMPUTE_DTYPE)
                value = torch.sum((Bj.T @ Bk) * gram[where[j], where[k]])
                E[j, k] += value
                if k != j:
                    E[k, j] += value
    return E


@dataclass(frozen=True)
class FunctionOverlap:
    """``interference[j][i] = I(j -> i)`` (diagonal 1) and ``cosine[i][j]``, both on domain ``i``'s inputs;
    ``energy[i][j][k] = sum_m <dW_j^m X_i^m, dW_k^m X_i^m>``, from which the energy of any sum of blocks on
    domain ``i``'s inputs follows exactly (cross terms included): ``sum_{j, k in S} energy[i][j][k]``."""

    interference: list[list[float]]
    cosine: list[list[float]]
    energy: list[list[list[float]]] | None = None


def function_overlap(deltas: Sequence[Mapping[str, LowRank]],
                     grams: Sequence[Mapping[str, torch.Tensor]]) -> FunctionOverlap:
    """Interference and functional cosine from ``grams[i]``: the projected Grams ``K^m`` of domain ``i``'s
    inputs (see :func:`lorablocks.passes.activations.projected_grams`)."""
    n = len(deltas)
    if len(grams) != n:
        raise ValueError(f"{len(grams)} probe domains for {n} blocks")
    interference = [[math.nan] * n for _ in range(n)]
    cosine = [[math.nan] * n for _ in range(n)]
    energy = []
    for i in range(n):
        E = _pair_energy(deltas, grams[i])
        energy.append(E.tolist())
        own = float(E[i, i])
        for j in range(n):
            interference[j][i] = float(E[j, j]) / own if own > 0 else math.nan
            den = math.sqrt(max(float(E[i, i]) * float(E[j, j]), 0.0))
            cosine[i][j] = float(E[i, j]) / den if den > 0 else math.nan
    return FunctionOverlap(interference=interference, cosine=cosine, energy=energy)
