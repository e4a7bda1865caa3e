"""Shared fixtures: tiny GPT-2 and Llama models with a tiny byte-level BPE tokenizer, and tiny QA domains.

Everything is built in the test process from fixed seeds; nothing is downloaded. The builders are plain
functions (``tiny_tokenizer``, ``tiny_gpt2``, ``tiny_llama``, ``write_domain``) so other test modules can
call them directly, and fixtures wrap them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # deterministic and polite on a shared 2-core machine
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_CORPUS = [
    "Question: What is two plus three?\nAnswer: The answer is five.",
    "Context: The sky is blue on a clear day.\nQuestion: What colour is the sky?\nAnswer: Blue.",
    "The quick brown fox jumps over the lazy dog 0123456789 times, said the doctor to the banker.",
    "Medicine, finance and math: questions and answers with numbers like 12, 34.5 and 6789.",
]


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on a few sentences, with ``<|endoftext|>`` as EOS and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_gpt2(vocab_size: int, seed: int = 0):
    """A 2-layer GPT-2 (hidden 32, 2 heads) with dropout off and random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size, n_positions=512, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(vocab_size: int, seed: int = 0):
    """A 2-layer Llama (hidden 32, 4 heads, 2 KV heads, MLP 64) with tied embeddings and random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def save_tiny_model(kind: str, folder: Path) -> Path:
    """Write a tiny model (``gpt2`` or ``llama``) and its tokenizer to ``folder`` and return it."""
    tok = tiny_tokenizer()
    model = tiny_gpt2(len(tok)) if kind == "gpt2" else tiny_llama(len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


_WORDS = ["alpha", "beta", "gamma", "delta", "sky", "blue", "fox", "dog", "doctor", "banker", "number"]


def make_examples(domain: str, n: int, seed: int = 0, context: bool = False) -> list[dict]:
    """Deterministic toy QA rows: arithmetic (``math``) or word questions (anything else)."""
    import random

    rng = random.Random(f"{domain}:{seed}")
    rows = []
    for i in range(n):
        if domain == "math":
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            q, ans = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}. The answer is {a + b}."
        else:
            w = rng.sample(_WORDS, k=rng.randint(1, 4))
            q, ans = f"Which words follow {w[0]}?", " ".join(w * rng.randint(1, 3))
        row = {"id": f"{domain}-{seed}-{i}", "question": q, "answer": ans}
        if context and i % 2 == 0:
            row["context"] = "The doctor said: " + " ".join(rng.sample(_WORDS, k=3))
        rows.append(row)
    return rows


def write_domain(folder: Path, domain: str, n_train: int = 48, n_val: int = 12, n_test: int = 12) -> Path:
    """A domain folder with train/validation/test.jsonl of toy rows."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("validation", n_val, 1), ("test", n_test, 2)):
        rows = make_examples(domain, n, seed, context=domain != "math")
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture(params=["gpt2", "llama"])
def tiny_model(request, tok):
    """Each tiny architecture in turn: ``(kind, model)``."""
    build = tiny_gpt2 if request.param == "gpt2" else tiny_llama
    return request.param, build(len(tok))


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny model folders usable as ``--model``: ``{"gpt2": path, "llama": path}``."""
    root = tmp_path_factory.mktemp("models")
    return {k: save_tiny_model(k, root / k) for k in ("gpt2", "llama")}


@pytest.fixture(scope="session")
def domains(tmp_path_factory) -> dict[str, Path]:
    """Two toy domain folders: ``math`` (arithmetic) and ``words``."""
    root = tmp_path_factory.mktemp("data")
    return {d: write_domain(root / d, d) for d in ("math", "words")}
