"""Tiny GPT-2 and Llama models built in the test (no hub), and PEFT adapters on them with random B."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

GPT2_TARGETS = ["c_attn", "c_proj"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
VOCAB = 64


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


TINY = {"gpt2": (tiny_gpt2, GPT2_TARGETS), "llama": (tiny_llama, LLAMA_TARGETS)}


def make_peft_adapter(kind: str, out: Path, seed: int, r: int = 4, alpha: float = 8.0, **lora_kwargs) -> Path:
    """Save a PEFT LoRA adapter for a tiny model with random non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    build, targets = TINY[kind]
    model = build()
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=lora_kwargs.pop("target_modules", targets),
                     lora_dropout=0.0, fan_in_fan_out=(kind == "gpt2"), **lora_kwargs)
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.save_pretrained(out)
    return out
