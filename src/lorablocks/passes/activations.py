"""Collect what target modules see on a few examples, projected onto the blocks' ``A`` factors.

For :mod:`lorablocks.core.function_overlap`: a forward pass of the *base* model over a domain's examples,
with a hook on each target module that adds ``(A X)(A X)^T`` (``A`` the stacked ``A`` factors of every
block touching the module, ``X`` the module's input at the counted positions) to a small ``R x R`` Gram.
A batch may name the counted positions (e.g. those predicting answer tokens); otherwise every non-padding one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from lorablocks.core.algebra import COMPUTE_DTYPE, LowRank
from lorablocks.core.function_overlap import stacked_A
from lorablocks.model.merge import target_weight
from lorablocks.passes.hooks import hooked_pass

__all__ = ["projected_grams"]


@torch.no_grad()
def projected_grams(model: nn.Module, batches: Iterable[tuple[torch.Tensor, ...]],
                    deltas: Sequence[Mapping[str, LowRank]]) -> dict[str, torch.Tensor]:
    """``K^m = sum over counted tokens of (A^m x)(A^m x)^T`` for every module any block touches.

    ``batches`` yields ``(input_ids, attention_mask)`` (every non-padding position counted) or
    ``(input_ids, attention_mask, counted)`` (a boolean mask of the positions counted); the model runs as it
    is (use the base model).
    """
    modules = list(dict.fromkeys(m for d in deltas for m in d))
    stacks = {m: stacked_A(deltas, m) for m in modules}
    grams = {m: torch.zeros(s.shape[0], s.shape[0], dtype=COMPUTE_DTYPE) for m, s in stacks.items()}

    def add(name: str, _site: str, x: torch.Tensor) -> None:
        proj = x.to(COMPUTE_DTYPE) @ stacks[name].to(x.device).T  # (tokens, R)
        grams[name] += (proj.T @ proj).cpu()

    for name in modules:
        target_weight(model, name)  # a clear error for a module the model lacks
    hooked_pass(model, modules, batches, add)
    return grams
