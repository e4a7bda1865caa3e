"""``learned``: the exact sum with one weight per block and per layer (CAT / LoRA Soups, arXiv 2410.13025).

``dW^l = sum_i alpha_i^l dW_i^l``. The weights are fitted elsewhere (:mod:`lorablocks.training.learned`,
which needs the model and a few examples of each domain) and recorded here as ``layer_weights``: layer key
-> one weight per block of the recipe. A module outside every numbered layer uses the key ``other``; a
layer the parameters do not name keeps the blocks' own weights.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pydantic import Field

from lorablocks.compose.methods import Method, MethodParams, ModuleContext, ModuleResult
from lorablocks.core import algebra
from lorablocks.core.algebra import LowRank
from lorablocks.errors import CompositionError

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


def layer_of(module: str) -> str:
    """The layer key of a module name: ``"12"`` for ``model.layers.12.mlp.down_proj``, else ``"other"``."""
    m = _LAYER.search(module)
    return m.group(1) if m else "other"


class LearnedParams(MethodParams):
    """The fitted weights: layer key -> one weight per block (in the recipe's order)."""

    layer_weights: dict[str, list[float]] = Field(default_factory=dict)


def combine(parts: Sequence[tuple[float, LowRank]], params: LearnedParams, ctx: ModuleContext) -> ModuleResult:
    """The exact sum with this module's layer weights in place of the blocks' weights."""
    weights = params.layer_weights.get(layer_of(ctx.name))
    if weights is None:
        ws = [w for w, _ in parts]
    else:
        if max(ctx.blocks, default=-1) >= len(weights):
            raise CompositionError(f"layer_weights of layer {layer_of(ctx.name)} has {len(weights)} values, "
                                   "fewer than the recipe's blocks", setting="params")
        ws = [weights[i] for i in ctx.blocks]
    total = algebra.add([{ctx.name: x} for _, x in parts], ws)
    return ctx.compress(total.get(ctx.name))


METHOD = Method(name="learned", summary="exact sum with one fitted weight per block and layer (LoRA Soups)",
                params=LearnedParams, combine=combine, linear=True, uses_zero_weights=True)
