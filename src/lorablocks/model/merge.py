"""Merging factored deltas into a model's base weights (the one place a dense ``out x in`` is formed).

``nn.Linear`` stores its weight as ``(out, in)``: add ``dW``. GPT-2's ``Conv1D`` stores ``(in, out)``
(PEFT's ``fan_in_fan_out``): add ``dW.T``. The dense delta is formed one module at a time in float32
(or the weight's dtype if wider) and checked for NaN before it touches the weight. :func:`target_weight` is the
one place an adapter's module is checked against a model: it must be a Linear or Conv1D whose weight is not
tied to the input embedding (a LoRA on a tied ``lm_head`` is refused, like embedding LoRA).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorablocks.core.algebra import LowRank
from lorablocks.errors import (LoraBlocksError, ModelError, NonFiniteError, ShapeMismatchError, UnsupportedAdapterError,
                               one_line)
from lorablocks.files.outputs import atomic_dir, utc_now, versions

__all__ = ["apply_delta", "merged", "check_delta_fits", "target_weight", "merged_weight", "write_merged_model"]


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, without importing transformers here.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def target_weight(model: nn.Module, name: str) -> tuple[nn.Parameter, bool]:
    """The weight of module ``name`` and whether it is stored transposed (``Conv1D``)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ShapeMismatchError(f"the model has no module {name}: the adapter was made for another model")
    if not isinstance(module, nn.Linear) and not _is_conv1d(module):
        raise ShapeMismatchError(f"module {name} is a {type(module).__name__}; only Linear and Conv1D can be merged")
    if _tied_to_embedding(model, module.weight):
        raise UnsupportedAdapterError(
            f"module {name} shares its weight with the input embedding (tied embeddings): merging a LoRA on it "
            "would change the embedding too, unlike the unmerged adapter; like embedding LoRA, it is not supported")
    return module.weight, _is_conv1d(module)


def _tied_to_embedding(model: nn.Module, weight: torch.Tensor) -> bool:
    """Whether ``weight`` is (a view of) the model's input embedding matrix (``lm_head`` of a tied model)."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return False
    other = getattr(embedding, "weight", None)
    return isinstance(other, torch.Tensor) and (other is weight or (
        other.device == weight.device and other.numel() > 0 and other.data_ptr() == weight.data_ptr()))


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
def merged_weight(original: torch.Tensor, x: LowRank, transposed: bool, name: str, weight: float = 1.0) -> torch.Tensor:
    """``W0 + weight * B @ A`` (``+ (B @ A).T`` for a transposed ``Conv1D``), in float32 or wider, in ``W0``'s dtype.

    One fused ``addmm`` from the factors (no separate dense delta), and the one place a merged weight is
    computed, so that merging the same delta into the same original weight gives the same bits wherever it
    happens (a merged model folder, an evaluation, a live server).
    """
    compute = torch.promote_types(original.dtype, torch.float32)
    B, A = x.B.to(original.device, compute), x.A.to(original.device, compute) * weight
    base = original.to(compute)
    out = torch.addmm(base, A.T, B.T) if transposed else torch.addmm(base, B, A)
    # one reduction finds NaN/inf anywhere (they propagate into the sum); the full scan only when it does
    if not torch.isfinite(out.sum()) and not torch.isfinite(out).all() and torch.isfinite(base).all():
        raise NonFiniteError(f"module {name}: the merged delta has NaN or inf")
    return out.to(original.dtype)


@torch.no_grad()
def apply_delta(model: nn.Module, delta: Mapping[str, LowRank], weight: float = 1.0) -> None:
    """Add ``weight * delta`` to the model's base weights in place."""
    check_delta_fits(model, delta)
    for name, x in delta.items():
        param, transposed = target_weight(model, name)
        param.copy_(merged_weight(param, x, transposed, name, weight))


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


def write_merged_model(model_dir: str | os.PathLike, delta: Mapping[str, LowRank], out: str | os.PathLike,
                       record: dict[str, Any], force: bool = False, inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Load a local model folder (or a built-in model's), add ``delta`` to its weights and save a normal model
    folder with ``record`` as its ``lorablocks.json``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorablocks.model.models import BUILTIN_MODELS, check_model_folder, resolve_model

    if str(model_dir) in BUILTIN_MODELS:
        model_dir = resolve_model(str(model_dir))  # the converted built-in model's folder
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir} is not a model folder (no config.json); give a local model folder "
                         f"or a built-in model name ({', '.join(BUILTIN_MODELS)})", setting="merge_into")
    check_model_folder(model_dir, setting="merge_into")  # safetensors weights only: never unpickled
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", local_files_only=True,
                                                     use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the model in {model_dir}: {one_line(exc)}") from None
    apply_delta(model, delta)
    with atomic_dir(out, force=force, kind="merged-model", inputs=[model_dir, *inputs]) as tmp:
        try:
            model.save_pretrained(tmp)
        except Exception as exc:  # safetensors raises its own error type on a full disk
            raise LoraBlocksError(f"cannot write the merged model to {out}: {one_line(exc)}") from None
        try:
            AutoTokenizer.from_pretrained(model_dir, local_files_only=True).save_pretrained(tmp)
        except (OSError, ValueError):
            pass  # a model folder without a tokenizer stays without one
        full = {"tool": "lorablocks", "created": utc_now(), "versions": versions(), **record, "merged_into": str(model_dir)}
        (tmp / "lorablocks.json").write_text(json.dumps(full, indent=2, default=str) + "\n")
    return Path(out)

