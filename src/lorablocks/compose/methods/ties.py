"""``ties`` (TIES-Merging, arXiv 2306.01708) with PEFT's semantics, in core space (default) or full space.

Per module: trim each task tensor to its top ``density`` fraction by magnitude, elect a sign per entry from
the unweighted trimmed tensors (``total``: sign of their sum; ``frequency``: sign of their sign count), and
average the *weighted* entries that agree with it (``sum_i m_i w_i T_i / max(1, sum_i m_i)``), exactly as
PEFT's ``merge_utils.ties``. The task tensors are the ``R x R`` cores ``M_i = U_B^T B_i A_i V_A`` (``core``:
factored, rank <= R = sum r_i) or the dense deltas ``B_i A_i`` (``full``: one ``out x in`` matrix per
module, re-factored by a truncated SVD at the rank mode; PEFT's ``ties_svd``).

This file also holds the shared per-module driver of the element-wise methods (``dare_linear``,
``dare_ties``, ``magnitude_prune``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from lorablocks.compose.methods import Method, MethodParams, ModuleContext, ModuleResult
from lorablocks.core import algebra, sparsify
from lorablocks.core.algebra import LowRank
from lorablocks.core.core_space import core_space, from_core, refactor_dense

__all__ = ["Space", "MajoritySign", "TiesParams", "combine_elementwise", "compress_as", "METHOD"]

Space = Literal["core", "full"]
MajoritySign = Literal["total", "frequency"]

DENSITY = Field(0.5, gt=0.0, le=1.0, description="Fraction of each task tensor's entries kept, in (0, 1].")
SPACE = Field("core", description="core: the rule on the R x R core matrices (factored); full: on one dense "
                                  "out x in delta per module, re-factored at the rank mode (PEFT's *_svd).")
MAJORITY = Field("total", description="Sign election: total (sign of the sum) or frequency (sign of the count).")


class TiesParams(MethodParams):
    """TIES: density, space, sign election."""

    density: float = DENSITY
    space: Space = SPACE
    majority_sign: MajoritySign = MAJORITY


def compress_as(ctx: ModuleContext, x: LowRank, dtype: torch.dtype) -> ModuleResult:
    """``ctx.compress(x)`` (float64 in), with the result's factors cast to ``dtype``."""
    out = ctx.compress(x)
    if out.x is not None:
        out = ModuleResult(LowRank(B=out.x.B.to(dtype), A=out.x.A.to(dtype)), out.report)
    return out


def combine_elementwise(parts: Sequence[tuple[float, LowRank]], ctx: ModuleContext, rule: sparsify.Rule,
                        density: float, space: Space, majority_sign: MajoritySign = "total",
                        seed: int | None = None) -> ModuleResult:
    """One module by an element-wise ``rule`` (:func:`lorablocks.core.sparsify.merge`).

    ``core``: ``dW = U_B f(M_1..M_n) V_A^T`` then ``ctx.compress``. ``full``: ``f(B_1 A_1, ..., B_n A_n)``
    formed densely (float32 or wider), then :func:`~lorablocks.core.core_space.refactor_dense` at the rank
    mode. DARE's masks come from ``ctx.generator(seed)``: per module, independent of the visiting order.
    """
    weights = [w for w, _ in parts]
    dtype = parts[0][1].dtype
    for _, x in parts[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    generator = ctx.generator(seed) if seed is not None else None
    if space == "core":
        cs = core_space([x for _, x in parts])
        M = sparsify.merge(cs.cores, weights, rule, density, majority_sign, generator)
        return compress_as(ctx, from_core(cs, M), dtype)
    dense_dtype = torch.promote_types(dtype, torch.float32)
    dense = [algebra.to_dense(x, dense_dtype) for _, x in parts]
    merged = sparsify.merge(dense, weights, rule, density, majority_sign, generator)
    del dense
    x, report = refactor_dense(ctx.name, merged, ctx.rank, ctx.rtol, dtype)
    return ModuleResult(x, report)


def combine(parts: Sequence[tuple[float, LowRank]], params: TiesParams, ctx: ModuleContext) -> ModuleResult:
    """TIES: trim to ``density``, elect signs, disjoint weighted mean (module docstring)."""
    return combine_elementwise(parts, ctx, "ties", params.density, params.space, params.majority_sign)


METHOD = Method(name="ties", summary="TIES: trim, elect sign, disjoint mean (core space or full space)",
                params=TiesParams, combine=combine)
