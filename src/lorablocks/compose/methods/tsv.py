"""``tsv`` (TSV-Merge, "Task Singular Vectors", arXiv 2412.00081; reference code
``AntoAndGar/task_singular_vectors``, ``compute_and_sum_svd_mem_reduction``), factored.

Per module: the SVD of each weighted block ``w_i dW_i = U_i diag(S_i) V_i^T`` (from its factors, thin QR),
its top ``k_i`` singular triplets kept; ``U = [U_1 ... U_n]``, ``V = [V_1 ... V_n]``, ``S = [S_1; ...; S_n]``
concatenated; each of ``U`` and ``V`` replaced by its orthogonal polar factor (``X = P Sigma Q^T -> P Q^T``,
on the tall ``out x K`` / ``in x K`` matrices through QR and a ``K x K`` SVD); result
``U_perp diag(S) V_perp^T`` (rank <= K = sum k_i), re-factored at the rank mode.

``k_i = int(fraction * min(out, in))`` as in the reference code (whose ``fraction`` is ``1 / n``, the
default here), at least 1 and at most the block's rank: the reference takes its triplets from a dense SVD, so
for a LoRA block of rank ``r_i <= min(out, in) / n`` it keeps all ``r_i`` non-zero ones plus null
directions with zero singular values; here only the non-zero ones enter the polar factors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from lorablocks.compose.methods import Method, MethodParams, ModuleContext, ModuleResult
from lorablocks.compose.methods.ties import compress_as
from lorablocks.core.algebra import CANCEL_TOL, COMPUTE_DTYPE, LowRank
from lorablocks.core.core_space import factored_svd, polar_factor


class TsvParams(MethodParams):
    """TSV-Merge: how many singular triplets each block keeps."""

    fraction: float | None = Field(
        None, gt=0.0, le=1.0,
        description="Each block keeps its top int(fraction * min(out, in)) singular triplets (at least 1, at most "
                    "its rank); default 1/n, as the reference code.")


def task_triplets(w: float, x: LowRank, k_max: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``k <= k_max`` non-zero triplets of ``w B A = (sign(w) U) diag(|w| S) V^T``: ``U (out, k)``,
    ``S (k,)``, ``V (in, k)``; singular values of ``B A`` below ``CANCEL_TOL |B|_F |A|_F`` are exact zeros."""
    U, S, Vh = factored_svd(x)
    floor = CANCEL_TOL * float(x.B.to(COMPUTE_DTYPE).norm() * x.A.to(COMPUTE_DTYPE).norm())
    k = min(k_max, int((S > floor).sum()))
    sign = 1.0 if w >= 0 else -1.0
    return U[:, :k] * sign, S[:k] * abs(w), Vh[:k].T


def combine(parts: Sequence[tuple[float, LowRank]], params: TsvParams, ctx: ModuleContext) -> ModuleResult:
    """``polar([U_1..U_n]) diag([S_1..S_n]) polar([V_1..V_n])^T`` of the truncated per-block SVDs."""
    out_dim, in_dim = parts[0][1].shape
    fraction = params.fraction if params.fraction is not None else 1.0 / len(parts)
    k_max = max(1, int(fraction * min(out_dim, in_dim)))
    dtype = parts[0][1].dtype
    triplets = [task_triplets(w, x, k_max) for w, x in parts]
    S = torch.cat([s for _, s, _ in triplets])
    if S.numel() == 0:
        return ctx.compress(None)
    U = polar_factor(torch.cat([u for u, _, _ in triplets], dim=1))
    V = polar_factor(torch.cat([v for _, _, v in triplets], dim=1))
    return compress_as(ctx, LowRank(B=U * S, A=V.T), dtype)


METHOD = Method(name="tsv", summary="TSV-Merge: per-block top singular triplets, orthogonalised jointly (factored)",
                params=TsvParams, combine=combine)

