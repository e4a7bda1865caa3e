"""``magnitude_prune``: trim each task tensor to its top ``density`` fraction by magnitude, then the
weighted sum ``sum_i w_i prune(T_i)`` (PEFT's ``merge_utils.magnitude_prune``), in core space (default: the
``R x R`` cores, factored) or full space (dense per module, re-factored; PEFT's ``magnitude_prune_svd``).
"""

from __future__ import annotations

from collections.abc import Sequence

from lorablocks.compose.methods import Method, MethodParams, ModuleContext, ModuleResult
from lorablocks.compose.methods.ties import DENSITY, SPACE, Space, combine_elementwise
from lorablocks.core.algebra import LowRank


class MagnitudePruneParams(MethodParams):
    """Magnitude pruning: density and space."""

    density: float = DENSITY
    space: Space = SPACE


def combine(parts: Sequence[tuple[float, LowRank]], params: MagnitudePruneParams, ctx: ModuleContext) -> ModuleResult:
    """``sum_i w_i prune(T_i, density)``."""
    return combine_elementwise(parts, ctx, "magnitude_prune", params.density, params.space)


METHOD = Method(name="magnitude_prune", summary="trim each block to its largest entries, then the weighted sum",
                params=MagnitudePruneParams, combine=combine)
