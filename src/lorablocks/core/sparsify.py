"""Element-wise merge rules over task tensors (TIES, DARE, magnitude pruning), with PEFT's semantics.

Task tensors ``T_i`` of one shape (a module's dense deltas, or its core matrices), weights ``w_i``, density
``d`` in ``(0, 1]``. These are the definitions of PEFT ``peft/utils/merge_utils.py``:

* magnitude pruning: keep the ``k = int(d * numel)`` entries of largest ``|T_i|``, zero the rest;
* DARE drop: keep each entry with probability ``d`` and divide the kept ones by ``d``;
  ``d >= 1`` prunes nothing in both (PEFT returns the tensor unchanged);
* sign election, on the *unweighted* trimmed tensors: ``s = sign(sum_i T_i)`` ("total") or
  ``s = sign(sum_i sign(T_i))`` ("frequency"), ``s = +1`` where the sum is 0;
* disjoint merge, where the weights enter: ``sum_i [sign T_i = s] w_i T_i / max(1, sum_i [sign T_i = s])``.

Rules: ``linear`` ``sum_i w_i T_i``; ``magnitude_prune`` ``sum_i w_i prune(T_i)``; ``ties`` disjoint merge
of the pruned tensors; ``dare_linear`` ``sum_i w_i drop(T_i)``; ``dare_ties`` disjoint merge of the dropped.
Pure functions: no files, no modules; the caller chooses the space (full ``out x in`` or core ``R x R``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

__all__ = ["Rule", "MajoritySign", "RULES", "magnitude_mask", "magnitude_prune", "drop_mask", "dare_drop",
           "elect_sign", "disjoint_merge", "weighted_sum", "merge"]

Rule = Literal["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
MajoritySign = Literal["total", "frequency"]
RULES: tuple[str, ...] = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def magnitude_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the ``k = int(density * numel)`` entries of largest ``|t|`` (all when ``density >= 1``).

    Exactly PEFT's choice (``torch.topk(|t|.flatten(), k)``), found faster: the ``k``-th largest magnitude
    by ``kthvalue``; when no other entry equals it the set is ``|t| >= threshold``, unique. Otherwise (a tie at
    the threshold, common among millions of float32 entries) ``torch.topk`` itself picks among the tied
    entries, as in PEFT: on a module of ``N`` entries one entry chosen differently already moves the merged
    delta by about ``1 / sqrt(N)`` of its norm.
    """
    n = t.numel()
    k = int(density * n)
    if density >= 1 or k >= n:
        return torch.ones_like(t, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(t, dtype=torch.bool)
    flat = t.abs().reshape(-1)
    threshold = torch.kthvalue(flat, n - k + 1).values  # the k-th largest magnitude
    keep = flat >= threshold
    if int(keep.sum()) != k:
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.topk(flat, k=k, largest=True).indices] = True
    return keep.reshape(t.shape)


def magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """``t`` with all but its ``int(density * numel)`` largest-magnitude entries set to zero."""
    if density >= 1:
        return t
    return t * magnitude_mask(t, density)


def drop_mask(shape: Sequence[int], density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE's random keep mask: each entry kept independently with probability ``density`` (``u < density``,
    ``u ~ U[0, 1)`` drawn in float64 from ``generator``: the same generator state gives the same mask)."""
    return torch.rand(tuple(shape), generator=generator, dtype=torch.float64) < density


def dare_drop(t: torch.Tensor, density: float, keep: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE: ``t * keep / density`` (drop, then rescale so the expectation is ``t``); ``density >= 1`` returns
    ``t``. ``keep`` is drawn with :func:`drop_mask` from ``generator`` unless given."""
    if density >= 1:
        return t
    if keep is None:
        keep = drop_mask(t.shape, density, generator)
    return t * keep.to(t.dtype) / density


def elect_sign(tensors: Sequence[torch.Tensor], method: MajoritySign = "total") -> torch.Tensor:
    """The elected sign as a boolean ``s > 0``: ``sum_i T_i >= 0`` ("total") or ``sum_i sign(T_i) >= 0``
    ("frequency"); ties go to ``+`` as in PEFT's ``calculate_majority_sign_mask``."""
    if method not in ("total", "frequency"):
        raise ValueError(f"majority sign method must be total or frequency, got {method!r}")
    total = torch.zeros_like(tensors[0])
    for t in tensors:
        total.add_(t if method == "total" else t.sign())
    return total >= 0


def disjoint_merge(tensors: Sequence[torch.Tensor], weights: Sequence[float], positive: torch.Tensor) -> torch.Tensor:
    """``sum_i m_i w_i T_i / max(1, sum_i m_i)`` with ``m_i = [sign(T_i) = s]`` (zeros never agree).

    ``positive`` is the elected sign (:func:`elect_sign`). One task at a time: no stacked copy of the tensors.
    """
    num = torch.zeros_like(tensors[0])
    count = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights):
        agree = torch.where(positive, t > 0, t < 0)
        num.add_(t * agree, alpha=float(w))
        count.add_(agree.to(count.dtype))
    return num / count.clamp(min=1.0)


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_i w_i T_i``."""
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights):
        out.add_(t, alpha=float(w))
    return out


def merge(tensors: Sequence[torch.Tensor], weights: Sequence[float], rule: Rule, density: float = 1.0,
          majority_sign: MajoritySign = "total", generator: torch.Generator | None = None,
          keep_masks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """One merged tensor from ``tensors`` by ``rule`` (module docstring), as PEFT's function of that name.

    DARE rules draw one keep mask per task, in order, from ``generator`` (or take ``keep_masks``).
    """
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"{len(weights)} weights for {len(tensors)} tensors")
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    if not (0.0 < density <= 1.0):
        raise ValueError(f"density must be in (0, 1], got {density}")
    if rule in ("ties", "magnitude_prune"):
        trimmed = [magnitude_prune(t, density) for t in tensors]
    elif rule in ("dare_linear", "dare_ties"):
        masks = list(keep_masks) if keep_masks is not None else [None] * len(tensors)
        trimmed = [dare_drop(t, density, m, generator) for t, m in zip(tensors, masks)]
    else:
        trimmed = list(tensors)
    if rule in ("ties", "dare_ties"):
        return disjoint_merge(trimmed, weights, elect_sign(trimmed, majority_sign))
    return weighted_sum(trimmed, weights)
