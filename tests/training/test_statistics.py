"""train writes the adapter's input statistics: the Grams of its own model's inputs on its training examples."""

from __future__ import annotations

import json

import pytest
import torch

from lorablocks.files.statistics import STATS_NAME, open_statistics
from lorablocks.training.train import RECORD_NAME, train_adapter
from tests.training.test_train import _cfg


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_train_writes_statistics_of_its_own_inputs(kind, tiny_model_dirs, domains, tmp_path):
    from lorablocks.files.adapters import open_adapter
    from lorablocks.model.session import ComposedModel
    from lorablocks.passes.statistics import budgeted, collect_grams
    from lorablocks.training.data import resolve_domains, tokenize_examples

    out = tmp_path / "ad"
    train_adapter(_cfg(tiny_model_dirs[kind], [domains["math"]], out, statistics_tokens=600), progress=False)
    rec = json.loads((out / RECORD_NAME).read_text())
    stats = open_statistics(out / STATS_NAME)
    assert rec["statistics"]["sha256"] == stats.sha256 and rec["statistics"]["data"]["split"] == "train"
    adapter = open_adapter(out)
    stats.check_fits(adapter.shapes, adapter.base_model, "the adapter")  # every module, right widths, same model
    assert 0 < stats.data["tokens"] <= 600
    # the same Grams again from the adapter applied to the base model (merged weights) on the same examples
    session = ComposedModel.load(str(tiny_model_dirs[kind]))
    domain = resolve_domains([str(domains["math"])])[0]
    exs = budgeted(tokenize_examples(session.tokenizer, domain.load("train"), 256).examples, 600)
    with session.composed(adapter.load().delta):
        again = collect_grams(session.model, adapter.modules, exs, session.tokenizer.eos_token_id)
    assert again.tokens == stats.data["tokens"]
    for module in adapter.modules:
        g1, g2 = stats.gram(module).dense(), again.grams[again_site(again, module)].dense()
        assert torch.allclose(g1, g2, rtol=1e-3, atol=1e-4), module
    # and they are the trained model's inputs, not the base model's (the first layer's input is the same)
    with session.composed(None):
        base = collect_grams(session.model, adapter.modules, exs, session.tokenizer.eos_token_id)
    last = adapter.modules[-1]
    assert not torch.allclose(stats.gram(last).dense(), base.grams[again_site(base, last)].dense(), atol=1e-6)


def again_site(collected, module: str) -> str:
    return next(s for s, ms in collected.modules.items() if module in ms)


def test_statistics_off_writes_none(tiny_model_dirs, domains, tmp_path):
    out = tmp_path / "ad"
    train_adapter(_cfg(tiny_model_dirs["llama"], [domains["math"]], out, max_steps=2, statistics=False), progress=False)
    assert not (out / STATS_NAME).exists() and "statistics" not in json.loads((out / RECORD_NAME).read_text())
