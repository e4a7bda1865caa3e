"""A LoRA on a tied ``lm_head`` is refused where adapters meet a model (issue 14): merging it would change the
shared input embedding too, so the merged model would differ from PEFT's unmerged one."""

from __future__ import annotations

import pytest
import torch

from lorablocks.core.algebra import LowRank
from lorablocks.errors import UnsupportedAdapterError
from lorablocks.model.merge import apply_delta, check_delta_fits, target_weight
from tests.tiny_models import tiny_gpt2, tiny_llama


def _random(out: int, inp: int, r: int = 2) -> LowRank:
    g = torch.Generator().manual_seed(3)
    return LowRank(B=torch.randn(out, r, generator=g), A=torch.randn(r, inp, generator=g))


def test_tied_lm_head_is_refused_and_nothing_changes():
    model = tiny_llama()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    before = model.get_input_embeddings().weight.detach().clone()
    out, inp = model.lm_head.weight.shape
    delta = {"model.layers.0.self_attn.q_proj": _random(*model.model.layers[0].self_attn.q_proj.weight.shape),
             "lm_head": _random(out, inp)}
    for call in (lambda: target_weight(model, "lm_head"), lambda: check_delta_fits(model, delta),
                 lambda: apply_delta(model, delta)):
        with pytest.raises(UnsupportedAdapterError, match="lm_head shares its weight with the input embedding"):
            call()
    assert torch.equal(model.get_input_embeddings().weight, before)


def test_untied_lm_head_merges():
    model = tiny_gpt2()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie explicitly
    emb = model.get_input_embeddings().weight.detach().clone()
    head = model.lm_head.weight.detach().clone()
    x = _random(*head.shape)
    apply_delta(model, {"lm_head": x})
    assert torch.equal(model.get_input_embeddings().weight, emb)
    assert torch.allclose(model.lm_head.weight, head + x.B @ x.A, atol=1e-5)
    assert not torch.equal(model.lm_head.weight, head)
