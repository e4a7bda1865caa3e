"""``regmean`` (RegMean, arXiv 2212.09849): per module, the least-squares merge on each block's inputs.

``dW* = (sum_i w_i dW_i G_i') (sum_i w_i G_i')^-1`` with ``G_i'`` the block's input Gram with its
off-diagonal scaled by ``alpha`` (:mod:`lorablocks.core.regmean`), factored exactly at rank ``sum r_i``
and then re-factored at the rank mode. On each domain's inputs the composite acts as that domain's own
block as far as the domains' inputs differ. Weights are relative (equal Grams give the weighted mean
``sum w_i dW_i / sum w_i``) and must not be negative: to unlearn a block, compose the others without it.

Each block needs its input statistics (``lorablocks stats``, written by ``train``): the Grams reach
``combine`` through ``ModuleContext.grams``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from lorablocks.compose.methods import Method, MethodParams, ModuleContext, ModuleResult
from lorablocks.compose.methods.ties import compress_as
from lorablocks.core.algebra import LowRank
from lorablocks.core.regmean import DEFAULT_ALPHA, Factored, factor, regmean
from lorablocks.errors import CompositionError


class RegMeanParams(MethodParams):
    """RegMean: how much of each Gram's off-diagonal is kept."""

    alpha: float = Field(DEFAULT_ALPHA, ge=0.0, le=1.0,
                         description="Off-diagonal scaling of each Gram, in [0, 1] (1: plain least squares, "
                                     "0: diagonal only).")


def combine(parts: Sequence[tuple[float, LowRank]], params: RegMeanParams, ctx: ModuleContext) -> ModuleResult:
    """RegMean of this module's blocks with their Grams (module docstring)."""
    if len(ctx.grams) != len(parts) or any(g is None for g in ctx.grams):
        raise CompositionError(f"module {ctx.name}: regmean needs every block's input statistics", setting="statistics")
    dtype = parts[0][1].dtype
    for _, x in parts[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    weights = [float(w) for w, _ in parts]
    factored = next((f for f in _RECENT if f.matches(ctx.grams, weights, params.alpha)), None)
    if factored is None and len(parts) > 1:
        factored = factor(weights, ctx.grams, params.alpha)
        _RECENT[:] = [factored, *_RECENT[:1]]
    return compress_as(ctx, regmean(parts, ctx.grams, params.alpha, factored), dtype)


#: the last two input sites' factorisations: modules fed by one site (q/k/v) come close together in a
#: compose, and their Grams are the very same objects (:meth:`BlockStatistics.gram` keeps the last sites read)
_RECENT: list[Factored] = []


METHOD = Method(name="regmean", summary="least squares on each block's input statistics (RegMean), factored",
                params=RegMeanParams, combine=combine, needs_statistics=True)
