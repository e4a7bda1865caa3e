"""The learned method: per-layer weights applied exactly, fitted with the model frozen, never worse than the start."""

from __future__ import annotations

import json

import pytest
import torch

from lorablocks.cli import run_app
from lorablocks.compose import Block, compose, make_recipe
from lorablocks.compose.methods.learned import layer_of
from lorablocks.core import algebra
from lorablocks.files.adapters import load_adapter
from tests.tiny_models import make_peft_adapter


def test_layer_keys():
    assert layer_of("model.layers.12.mlp.down_proj") == "12"
    assert layer_of("transformer.h.0.attn.c_attn") == "0"
    assert layer_of("lm_head") == "other"


def test_layer_weights_are_applied_per_layer_exactly(tmp_path):
    a = load_adapter(make_peft_adapter("llama", tmp_path / "a", seed=1)).delta
    b = load_adapter(make_peft_adapter("llama", tmp_path / "b", seed=2)).delta
    lw = {"0": [0.5, -2.0], "1": [1.5, 0.0]}
    recipe = make_recipe([Block(name="a"), Block(name="b")], method="learned", params={"layer_weights": lw})
    out = compose(recipe, [a, b])
    for m in a:
        wa, wb = lw[layer_of(m)]
        want = wa * algebra.to_dense(a[m], torch.float64) + wb * algebra.to_dense(b[m], torch.float64)
        assert torch.allclose(algebra.to_dense(out.delta[m], torch.float64), want, atol=1e-5)
    assert any(layer_of(m) == "1" for m in out.delta)


def test_cli_learned_fits_and_never_returns_worse_than_start(tmp_path, tiny_model_dirs, domains, capsys):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dirs["llama"]
    paths = [make_peft_adapter("llama", tmp_path / n, seed=s, model=AutoModelForCausalLM.from_pretrained(model_dir),
                               std=0.05) for n, s in (("a", 1), ("b", 2))]
    code = run_app(["combine", *map(str, paths), "--method", "learned", "--model", str(model_dir), "--data",
                    str(domains["math"]), "--data", str(domains["words"]), "--steps", "6", "--limit", "8",
                    "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0, err
    rec = json.loads((tmp_path / "out" / "lorablocks.json").read_text())
    assert rec["recipe"]["method"] == "learned"
    fit = rec["learned"]
    assert fit["heldout_loss_best"] <= fit["heldout_loss_start"]
    lw = rec["recipe"]["params"]["layer_weights"]
    assert set(lw) == {"0", "1"} and all(len(v) == 2 for v in lw.values())
    if fit["improved"]:
        assert any(abs(w - 1.0) > 1e-6 for v in lw.values() for w in v)
    else:
        assert all(w == 1.0 for v in lw.values() for w in v) and fit["note"]


@pytest.mark.parametrize("args, words", [
    (["--method", "learned"], "needs data"),
    (["--data", "x"], "--data is for --method learned only"),
])
def test_learned_bad_input(tmp_path, args, words, capsys):
    a = make_peft_adapter("llama", tmp_path / "a", seed=1)
    code = run_app(["combine", str(a), "--out", str(tmp_path / "o"), *args])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and words in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_hooked_blocks_equal_the_merged_sum(tmp_path, tiny_model_dirs, domains, tok):
    """The fitting sees the same function as the merged composition (hooks add B (A x) per layer weight)."""
    from lorablocks.model.models import load_model
    from lorablocks.model.session import ComposedModel
    from lorablocks.training.data import resolve_domains, tokenize_examples
    from lorablocks.passes.evaluate import AnswerNLL
    from lorablocks.training.learned import _hooked, _loss

    model, tokenizer = load_model(str(tiny_model_dirs["llama"]))
    paths = [make_peft_adapter("llama", tmp_path / n, seed=s) for n, s in (("a", 1), ("b", 2))]
    deltas = [load_adapter(p).delta for p in paths]
    exs = tokenize_examples(tokenizer, resolve_domains([str(domains["math"])])[0].load("validation", 6), 128).examples
    alpha = torch.tensor([[0.7, 1.2], [-0.4, 0.9]])
    with _hooked(model, deltas, alpha, ["0", "1"]):
        hooked = float(_loss(AnswerNLL(model), exs, 0, grad=False))
    base = float(_loss(AnswerNLL(model), exs, 0, grad=False))
    lw = {"0": [0.7, -0.4], "1": [1.2, 0.9]}
    recipe = make_recipe([Block(name="a"), Block(name="b")], method="learned", params={"layer_weights": lw})
    session = ComposedModel(model)
    session.apply_recipe(recipe, deltas)
    merged = float(_loss(AnswerNLL(model), exs, 0, grad=False))
    assert abs(hooked - merged) < 1e-4 * abs(merged) and abs(merged - base) > 1e-3
