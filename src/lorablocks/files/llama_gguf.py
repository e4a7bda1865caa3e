"""How llama.cpp lays out a Llama model in GGUF: tensor names and the Q/K row order (pure functions).

llama.cpp's ``convert_hf_to_gguf.py`` names tensors through the ``gguf`` package's ``TensorNameMap``
(``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``) and reorders the rows of the query
and key projections of Llama models: transformers' rotary embedding rotates the two halves of each head
(``rotate_half``), llama.cpp's ``ROPE_NORM`` rotates interleaved pairs, so each head's rows
``[x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}]`` become ``[x_0, y_0, x_1, y_1, ...]`` (keys with the KV head count).
``convert_lora_to_gguf.py`` applies the same reorder to the output side of a LoRA delta, ``lora_B``:
``P (B A) = (P B) A``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorablocks.errors import ModelError, UnsupportedAdapterError

__all__ = ["LlamaLayout", "read_layout", "permute_rows", "unpermute_rows", "SUPPORTED_MODEL_TYPES"]

#: ``config.model_type`` values written as llama.cpp's ``llama`` architecture (what is tested here).
SUPPORTED_MODEL_TYPES = ("llama",)


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's Llama ``permute``: within each of ``n_head`` heads, interleave the two halves
    of its rows. ``w`` is ``(n_head * head_dim, ...)`` (a weight or a LoRA ``B``)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ModelError(f"{rows} rows do not split into {n_head} heads of even size")
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`permute_rows` (GGUF row order back to transformers')."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class LlamaLayout:
    """What the GGUF layout of a Llama model depends on, read from its ``config.json``."""

    n_layer: int
    n_head: int
    n_head_kv: int
    tied_embeddings: bool
    config: dict[str, Any]

    def tensor_name(self, hf_name: str) -> str | None:
        """The GGUF name of a transformers tensor (``...q_proj.weight`` -> ``blk.N.attn_q.weight``), or None."""
        import gguf

        tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, self.n_layer)
        return tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def module_tensor(self, module: str) -> str:
        """The GGUF weight name of a LoRA target module; refuses modules llama.cpp has no tensor for."""
        name = self.tensor_name(module + ".weight")
        if name is None:
            raise UnsupportedAdapterError(f"module {module} has no llama.cpp tensor in a Llama model")
        if name == "output.weight" and self.tied_embeddings:
            raise UnsupportedAdapterError(
                f"module {module}: the model ties its output head to the token embedding, so llama.cpp has no "
                "separate output tensor to adapt")
        return name

    def to_gguf_rows(self, gguf_name: str, w: torch.Tensor) -> torch.Tensor:
        """``w`` (a weight, or a LoRA ``B``) of tensor ``gguf_name`` in llama.cpp's row order."""
        if gguf_name.endswith("attn_q.weight"):
            return permute_rows(w, self.n_head)
        if gguf_name.endswith("attn_k.weight"):
            return permute_rows(w, self.n_head_kv)
        return w


def read_layout(model_dir: str | os.PathLike) -> LlamaLayout:
    """The Llama layout of a local model folder; a one-line :class:`ModelError` for other models."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path} does not hold a JSON object")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(f"{model_dir} is a {model_type!r} model; GGUF export supports "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)} (llama.cpp's llama architecture) only")
    try:
        n_head = int(config["num_attention_heads"])
        layout = LlamaLayout(n_layer=int(config["num_hidden_layers"]), n_head=n_head,
                             n_head_kv=int(config.get("num_key_value_heads") or n_head),
                             tied_embeddings=bool(config.get("tie_word_embeddings", False)), config=config)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path} lacks a usable {exc} for a Llama model") from None
    return layout
