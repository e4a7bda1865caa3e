"""``sum``: the paper's naive sum ``sum_i w_i dW_i``, exact in factored form (rank <= sum r_i)."""

from __future__ import annotations

from collections.abc import Sequence

from lorablocks.compose.methods import Method, MethodParams, ModuleContext, ModuleResult
from lorablocks.core import algebra
from lorablocks.core.algebra import LowRank


class SumParams(MethodParams):
    """The sum takes no parameters beyond the blocks' weights."""


def combine(parts: Sequence[tuple[float, LowRank]], params: SumParams, ctx: ModuleContext) -> ModuleResult:
    """Concatenate ``[B_1 ... B_n]`` and ``[w_1 A_1; ...; w_n A_n]``, then re-factor at the rank mode."""
    total = algebra.add([{ctx.name: x} for _, x in parts], [w for w, _ in parts])
    return ctx.compress(total.get(ctx.name))


METHOD = Method(name="sum", summary="exact weighted sum of the deltas (the paper)", params=SumParams,
                combine=combine, linear=True)
