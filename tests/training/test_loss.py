"""The answer NLL on a tiny Gemma 3 (the second built-in model's architecture): the head applied to the
counted positions only equals the masked cross-entropy of the full logits; the target preset fits it."""

from __future__ import annotations

import pytest
import torch

from lorablocks.model.models import BUILTIN_MODELS, default_targets
from lorablocks.training.data import Example, collate, tokenize_examples
from lorablocks.training.loss import AnswerNLL, answer_nll


def tiny_gemma3(vocab_size: int, seed: int = 0):
    """A 2-layer Gemma 3 text model (hidden 32, 2 heads, 1 KV head, MLP 64, sliding window 4), tied embeddings."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                           max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=0,
                           tie_word_embeddings=True)
    return Gemma3ForCausalLM(cfg).eval()


@pytest.fixture()
def gemma(tok):
    return tiny_gemma3(len(tok))


def test_gemma3_targets_are_the_builtin_preset(gemma):
    targets = default_targets(gemma)
    assert targets == list(BUILTIN_MODELS["gemma3-270m"].targets) == ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    names = {n.rsplit(".", 1)[-1] for n, m in gemma.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(targets) <= names
    assert gemma.get_output_embeddings().weight is gemma.get_input_embeddings().weight  # tied: lm_head never a target


def test_gemma3_answer_nll_uses_head_on_counted_positions_and_equals_full_logits(gemma, tok):
    exs = [Example("1", "What is two plus three?", "The answer is five."), Example("2", "q", "Blue.", context="sky")]
    batch = collate(tokenize_examples(tok, exs, 64).examples, tok.pad_token_id)
    assert AnswerNLL(gemma).fast  # gemma3_text has a plain tied head and no logit soft-capping
    nll, counts = answer_nll(gemma, batch)
    with torch.no_grad():
        logits = gemma(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    ref = -(logp * batch.target_mask[:, :-1]).sum(dim=1)
    assert counts.tolist() == batch.target_mask.sum(dim=1).tolist() and (nll > 0).all()
    torch.testing.assert_close(nll.double(), ref, rtol=1e-5, atol=1e-5)
