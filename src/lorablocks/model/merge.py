"""Merging factored deltas into a model's base weights (the one place a dense ``out x in`` is formed).

``nn.Linear`` stores its weight as ``(out, in)``: add ``dW``. GPT-2's ``Conv1D`` stores ``(in, out)``
(PEFT's ``fan_in_fan_out``): add ``dW.T``. The dense delta is formed one module at a time in float32
(or the weight's dtype if wider) and checked for NaN before it touches the weight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from lorablocks.core.algebra import LowRank, to_dense
from lorablocks.errors import NonFiniteError, ShapeMismatchError

__all__ = ["apply_delta", "merged", "check_delta_fits", "target_weight"]


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, without importing transformers here.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def target_weight(model: nn.Module, name: str) -> tuple[nn.Parameter, bool]:
    """The weight of module ``name`` and whether it is stored transposed (``Conv1D``)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ShapeMismatchError(f"the model has no module {name}: the adapter was made for another model")
    if isinstance(module, nn.Linear):
        return module.weight, False
    if _is_conv1d(module):
        return module.weight, True
    raise ShapeMismatchError(f"module {name} is a {type(module).__name__}; only Linear and Conv1D can be merged")


def check_delta_fits(model: nn.Module, delta: Mapping[str, LowRank], label: str = "adapter") -> None:
    """Raise :class:`ShapeMismatchError` unless every module of ``delta`` exists with the right shape."""
    for name, x in delta.items():
        weight, transposed = target_weight(model, name)
        out_in = tuple(weight.shape[::-1]) if transposed else tuple(weight.shape)
        if out_in != x.shape:
            raise ShapeMismatchError(
                f"{label}: module {name} is {x.shape[0]}x{x.shape[1]} but the model's is "
                f"{out_in[0]}x{out_in[1]}: the adapter was made for another base model"
            )


@torch.no_grad()
def apply_delta(model: nn.Module, delta: Mapping[str, LowRank], weight: float = 1.0) -> None:
    """Add ``weight * delta`` to the model's base weights in place."""
    check_delta_fits(model, delta)
    for name, x in delta.items():
        param, transposed = target_weight(model, name)
        compute = torch.promote_types(param.dtype, torch.float32)
        dense = to_dense(x, compute) * weight
        if not torch.isfinite(dense).all():
            raise NonFiniteError(f"module {name}: the merged delta has NaN or inf")
        if transposed:
            dense = dense.T
        param.copy_((param.to(compute) + dense.to(param.device)).to(param.dtype))


@contextlib.contextmanager
def merged(model: nn.Module, delta: Mapping[str, LowRank]) -> Iterator[nn.Module]:
    """Temporarily merge ``delta`` into the model; the exact original weights are restored afterwards."""
    check_delta_fits(model, delta)
    saved = {name: target_weight(model, name)[0].detach().clone() for name in delta}
    try:
        apply_delta(model, delta)
        yield model
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                target_weight(model, name)[0].copy_(w)
