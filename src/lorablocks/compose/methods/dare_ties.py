"""``dare_ties`` (DARE, arXiv 2311.03099, with TIES' merge): drop each entry of each task tensor with
probability ``1 - density`` and rescale the kept ones by ``1 / density``; elect a sign per entry from the
unweighted dropped tensors (``total`` or ``frequency``); average the weighted entries that agree with it
(PEFT's ``merge_utils.dare_ties``). Core space (default) or full space; seeded per module like
``dare_linear``.
"""

from __future__ import annotations

from collections.abc import Sequence

from lorablocks.compose.methods import Method, MethodParams, ModuleContext, ModuleResult
from lorablocks.compose.methods.dare_linear import SEED
from lorablocks.compose.methods.ties import DENSITY, MAJORITY, SPACE, MajoritySign, Space, combine_elementwise
from lorablocks.core.algebra import LowRank


class DareTiesParams(MethodParams):
    """DARE + TIES merge: density, space, sign election, seed."""

    density: float = DENSITY
    space: Space = SPACE
    majority_sign: MajoritySign = MAJORITY
    seed: int = SEED


def combine(parts: Sequence[tuple[float, LowRank]], params: DareTiesParams, ctx: ModuleContext) -> ModuleResult:
    """Disjoint weighted mean of the DARE-dropped task tensors under the elected sign."""
    return combine_elementwise(parts, ctx, "dare_ties", params.density, params.space, params.majority_sign,
                               seed=params.seed)


METHOD = Method(name="dare_ties", summary="DARE drop and rescale, then TIES sign election and disjoint mean (seeded)",
                params=DareTiesParams, combine=combine)
