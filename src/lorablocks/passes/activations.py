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
    mask_box: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            keep = mask_box["mask"].reshape(-1).bool()
            flat = x.reshape(-1, x.shape[-1])[keep].to(COMPUTE_DTYPE)
            proj = flat @ stacks[name].to(flat.device).T  # (tokens, R)
            grams[name] += (proj.T @ proj).cpu()
        return hook

    handles = []
    for name in modules:
        target_weight(model, name)  # a clear error for a module the model lacks
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook_for(name)))
    try:
        was = model.training
        model.eval()
        for input_ids, attention_mask, *counted in batches:
            mask_box["mask"] = counted[0] if counted else attention_mask
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        model.train(was)
    finally:
        for h in handles:
            h.remove()
    return grams
