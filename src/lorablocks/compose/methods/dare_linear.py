"""``dare_linear`` (DARE, arXiv 2311.03099): drop each entry of each task tensor with probability
``1 - density``, rescale the kept ones by ``1 / density``, then the weighted sum ``sum_i w_i drop(T_i)``
(PEFT's ``merge_utils.dare_linear``), in core space (default) or full space.

Seeded: the masks of a module come from ``ctx.generator(seed)`` (seed and module name), drawn task by task
in order, so the same seed gives the same bytes whatever order modules are visited in.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from lorablocks.compose.methods import Method, MethodParams, ModuleContext, ModuleResult
from lorablocks.compose.methods.ties import DENSITY, SPACE, Space, combine_elementwise
from lorablocks.core.algebra import LowRank

SEED = Field(0, description="Seed of the random drop: the same seed gives the same bytes.")


class DareLinearParams(MethodParams):
    """DARE + weighted sum: density, space, seed."""

    density: float = DENSITY
    space: Space = SPACE
    seed: int = SEED


def combine(parts: Sequence[tuple[float, LowRank]], params: DareLinearParams, ctx: ModuleContext) -> ModuleResult:
    """``sum_i w_i T_i * keep_i / density`` with ``keep_i ~ Bernoulli(density)``."""
    return combine_elementwise(parts, ctx, "dare_linear", params.density, params.space, seed=params.seed)


METHOD = Method(name="dare_linear", summary="DARE: random drop and rescale, then the weighted sum (seeded)",
                params=DareLinearParams, combine=combine)
