"""The shared tiny GPT-2 and Llama (``tests/conftest.py``) at a fixed small vocabulary, and PEFT adapters on
them with random non-zero A and B."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from tests import conftest

GPT2_TARGETS = ["c_attn", "c_proj"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
VOCAB = 64


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    return conftest.tiny_gpt2(VOCAB, seed)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    return conftest.tiny_llama(VOCAB, seed)


TINY = {"gpt2": (tiny_gpt2, GPT2_TARGETS), "llama": (tiny_llama, LLAMA_TARGETS)}


def make_peft_adapter(kind: str, out: Path, seed: int, r: int = 4, alpha: float = 8.0, *, model=None,
                      std: float = 0.3, **lora_kwargs) -> Path:
    """Save a PEFT LoRA adapter for a tiny model (``model``, which is wrapped in place, or a fresh one) with
    random non-zero A and B of standard deviation ``std``."""
    from peft import LoraConfig, get_peft_model

    build, targets = TINY[kind]
    model = build() if model is None else model
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=lora_kwargs.pop("target_modules", targets),
                     lora_dropout=0.0, fan_in_fan_out=(kind == "gpt2"), **lora_kwargs)
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    peft_model.save_pretrained(out)
    return out
