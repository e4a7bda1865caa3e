"""PEFT adapter files: reading matches PEFT's own deltas, writing loads back in PEFT exactly, merging matches
PEFT's merge_and_unload, and unsupported adapters are refused."""

from __future__ import annotations

import json

import pytest
import torch

from lorablocks.core import algebra
from lorablocks.files.adapters import CONFIG_NAME, WEIGHTS_NAME, load_adapter
from lorablocks.files.writer import save_adapter
from lorablocks.compose.operations import CombineRequest, combine_files
from lorablocks.errors import AdapterFormatError, LoraBlocksError, NonFiniteError, UnsupportedAdapterError
from lorablocks.model.merge import apply_delta
from tests.tiny_models import TINY, VOCAB, make_peft_adapter

torch.set_num_threads(1)

INPUT = torch.tensor([[1, 5, 9, 2, 33, 7, 60, 4]])


def peft_delta_weights(kind: str, path) -> dict[str, torch.Tensor]:
    """PEFT's own delta per module, in the (out, in) orientation."""
    from peft import PeftModel

    build, _ = TINY[kind]
    pm = PeftModel.from_pretrained(build(), path)
    out = {}
    for name, module in pm.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            dw = module.get_delta_weight("default")
            out[name] = dw.T if kind == "gpt2" else dw
    return out


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits.double()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize(
    "lora_kwargs",
    [
        {},
        {"use_rslora": True},
        {"rank_pattern": {"PROJ": 2}, "alpha_pattern": {"PROJ": 3.0}},
    ],
    ids=["plain", "rslora", "patterns"],
)
def test_load_matches_peft_delta(tmp_path, kind, lora_kwargs):
    proj = "c_proj" if kind == "gpt2" else "v_proj"
    lora_kwargs = {k: {proj: v["PROJ"]} if isinstance(v, dict) else v for k, v in lora_kwargs.items()}
    path = make_peft_adapter(kind, tmp_path / "a", seed=1, r=4, alpha=8.0, **lora_kwargs)
    adapter = load_adapter(path)
    expected = peft_delta_weights(kind, path)
    assert set(adapter.delta) == set(expected)
    for name, dw in expected.items():
        got = algebra.to_dense(adapter.delta[name])
        assert torch.allclose(got, dw, atol=1e-6, rtol=1e-5), name
        assert dw.abs().max() > 0
    if "rank_pattern" in lora_kwargs:
        assert {x.rank for x in adapter.delta.values()} == {2, 4}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_peft_loads_our_combined_adapter_exactly(tmp_path, kind):
    from peft import PeftModel

    a = make_peft_adapter(kind, tmp_path / "a", seed=1, r=4)
    b = make_peft_adapter(kind, tmp_path / "b", seed=2, r=2, alpha=16.0, use_rslora=True)
    weights = [1.0, -0.5]
    result = combine_files([a, b], tmp_path / "sum", CombineRequest(weights=weights, rank="minimal"))
    build, _ = TINY[kind]

    # base + dense summed delta, computed independently from PEFT's own per-module deltas
    expected_model = build()
    da, db = peft_delta_weights(kind, a), peft_delta_weights(kind, b)
    with torch.no_grad():
        for name in da:
            module = expected_model.get_submodule(name)
            dense = weights[0] * da[name] + weights[1] * db[name]
            module.weight += dense.T if kind == "gpt2" else dense
    ours = PeftModel.from_pretrained(build(), tmp_path / "sum")
    base = logits(build())
    got, want = logits(ours), logits(expected_model)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert (got - base).abs().max() > 1e-2  # the adapter changed the model
    assert result.report.overall_rel_error < 1e-6
    record = json.loads((tmp_path / "sum" / "lorablocks.json").read_text())
    recipe = record["recipe"]
    assert [b["weight"] for b in recipe["blocks"]] == weights and recipe["rank"] == "minimal"
    assert [b["sha256"] for b in recipe["blocks"]] == [load_adapter(a).sha256, load_adapter(b).sha256]
    assert "torch" in record["versions"]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_merge_into_matches_peft_merge_and_unload(tmp_path, kind):
    from peft import PeftModel

    build, _ = TINY[kind]
    base_dir = tmp_path / "base"
    build().save_pretrained(base_dir)
    a = make_peft_adapter(kind, tmp_path / "a", seed=3)
    b = make_peft_adapter(kind, tmp_path / "b", seed=4, r=2)
    combine_files([a, b], tmp_path / "merged", merge_into=base_dir)

    pm = PeftModel.from_pretrained(build(), a, adapter_name="a")
    pm.load_adapter(b, adapter_name="b")
    pm.base_model.set_adapter(["a", "b"])
    reference = pm.merge_and_unload()
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    got, want = logits(ours), logits(reference)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert (got - logits(build())).abs().max() > 1e-2


def test_save_roundtrip_with_mixed_ranks_and_modules(tmp_path):
    from tests.core.test_algebra import random_delta

    delta = random_delta(40, rank=3)
    delta["v"] = algebra.LowRank(B=torch.randn(6, 5), A=torch.randn(5, 10))
    save_adapter(delta, tmp_path / "x", base_model="toy")
    back = load_adapter(tmp_path / "x")
    assert set(back.delta) == set(delta)
    for name in delta:
        assert torch.allclose(algebra.to_dense(back.delta[name]), algebra.to_dense(delta[name]), atol=1e-6)
    cfg = json.loads((tmp_path / "x" / CONFIG_NAME).read_text())
    assert cfg["r"] == 3 and cfg["rank_pattern"] == {"v": 5} and cfg["alpha_pattern"] == {"v": 5}
    with pytest.raises(Exception, match="exists"):
        save_adapter(delta, tmp_path / "x", base_model="toy")
    save_adapter(algebra.scale(delta, 2.0), tmp_path / "x", base_model="toy", force=True)
    again = load_adapter(tmp_path / "x")
    assert torch.allclose(algebra.to_dense(again.delta["q"]), 2 * algebra.to_dense(delta["q"]), atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_apply_delta_conv1d_transposes(tmp_path):
    """GPT-2 Conv1D stores (in, out): the square c_proj delta must be transposed (the authors' bug)."""
    model = TINY["gpt2"][0]()
    name = "transformer.h.0.attn.c_proj"  # square 32 x 32
    x = algebra.LowRank(B=torch.randn(32, 2), A=torch.randn(2, 32))
    before = model.get_submodule(name).weight.detach().clone()
    apply_delta(model, {name: x})
    after = model.get_submodule(name).weight.detach()
    assert torch.allclose(after - before, algebra.to_dense(x).T, atol=1e-6)
    assert not torch.allclose(after - before, algebra.to_dense(x), atol=1e-3)


# --- refusals ---------------------------------------------------------------------------------------------


def test_missing_and_not_an_adapter(tmp_path):
    with pytest.raises(AdapterFormatError, match="does not exist"):
        load_adapter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterFormatError, match="no adapter_config.json"):
        load_adapter(tmp_path / "empty")


def test_corrupt_and_truncated_weights(tmp_path):
    path = make_peft_adapter("llama", tmp_path / "a", seed=5)
    weights = path / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFormatError, match="corrupt or truncated"):
        load_adapter(path)
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterFormatError, match="corrupt or truncated"):
        load_adapter(path)
    (path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        load_adapter(path)


def test_pickled_bin_is_refused(tmp_path):
    path = make_peft_adapter("llama", tmp_path / "a", seed=6)
    (path / WEIGHTS_NAME).rename(path / "adapter_model.bin")
    with pytest.raises(UnsupportedAdapterError, match="pickled"):
        load_adapter(path)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"use_dora": True}, "DoRA"), ({"bias": "lora_only"}, "biases"), ({"modules_to_save": ["lm_head"]}, "full modules")],
)
def test_unrepresentable_adapters_are_refused(tmp_path, kwargs, match):
    path = make_peft_adapter("llama", tmp_path / "a", seed=7, **kwargs)
    with pytest.raises(UnsupportedAdapterError, match=match):
        load_adapter(path)


def test_nan_factor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_peft_adapter("llama", tmp_path / "a", seed=8)
    tensors = load_file(path / WEIGHTS_NAME)
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("inf")
    save_file(tensors, path / WEIGHTS_NAME)
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        load_adapter(path)


def test_rank_in_config_must_match_weights(tmp_path):
    path = make_peft_adapter("llama", tmp_path / "a", seed=9, r=4)
    cfg = json.loads((path / CONFIG_NAME).read_text())
    cfg["r"] = 8
    (path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(AdapterFormatError, match="rank 4 in its weights but 8"):
        load_adapter(path)


def test_vocab_constant_is_used():
    assert INPUT.max() < VOCAB


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_streamed_safetensors_reads_back_like_the_library(tmp_path, dtype):
    from safetensors.torch import load_file

    from tests.core.test_algebra import random_delta

    delta = random_delta(41, rank=3)
    save_adapter(delta, tmp_path / "x", base_model=None, dtype=dtype)
    tensors = load_file(tmp_path / "x" / WEIGHTS_NAME)
    assert len(tensors) == 2 * len(delta)
    for name, x in delta.items():
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        assert a.dtype == dtype and torch.equal(a, x.A.to(dtype))
        assert torch.equal(tensors[f"base_model.model.{name}.lora_B.weight"], x.B.to(dtype))


# --- bad configs and paths get one line that blames the right thing (issue 7) ----------------------------


def _edit_config(path, **changes):
    cfg = json.loads((path / CONFIG_NAME).read_text())
    for key, value in changes.items():
        if value is _DROP:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / CONFIG_NAME).write_text(json.dumps(cfg))
    return path


_DROP = object()


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"rank_pattern": ["q_proj", 2]}, "rank_pattern must be a JSON object"),
        ({"rank_pattern": {"v_proj": 2.5}}, r"rank_pattern\['v_proj'\] must be a whole number"),
        ({"rank_pattern": {"v_proj": "2"}}, r"rank_pattern\['v_proj'\] must be a whole number"),
        ({"alpha_pattern": {"v_proj": [1]}}, r"alpha_pattern\['v_proj'\] must be a finite number"),
        ({"alpha_pattern": [1]}, "alpha_pattern must be a JSON object"),
        ({"r": _DROP}, "adapter_config.json has no r"),
        ({"r": 0}, "r must be a whole number >= 1"),
        ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
        ({"lora_alpha": float("inf")}, "lora_alpha must be a finite number"),
        ({"modules_to_save": 3}, "full modules"),
        ({"use_rslora": "yes"}, "use_rslora must be true or false"),
    ],
)
def test_bad_config_values_blame_the_field(tmp_path, changes, match):
    path = _edit_config(make_peft_adapter("llama", tmp_path / "a", seed=11, r=4), **changes)
    with pytest.raises(LoraBlocksError, match=match) as info:
        load_adapter(path)
    assert "\n" not in str(info.value) and "lora_A" not in str(info.value)


def test_missing_r_with_default_rank_loads(tmp_path):
    """PEFT's default r is 8: an adapter without r whose weights have rank 8 is consistent."""
    path = _edit_config(make_peft_adapter("llama", tmp_path / "a", seed=12, r=8, alpha=16.0), r=_DROP)
    adapter = load_adapter(path)
    assert {s[:2] for s in adapter.module_scales.values()} == {(8, 16.0)}


def test_scale_overflow_blames_the_scale(tmp_path):
    path = _edit_config(make_peft_adapter("llama", tmp_path / "a", seed=13, r=4), lora_alpha=1e300)
    with pytest.raises(NonFiniteError, match="scale alpha/r"):
        load_adapter(path)


def test_symlink_loop_and_broken_link(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(AdapterFormatError, match="symbolic link loop"):
        load_adapter(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(AdapterFormatError, match="broken symbolic link"):
        load_adapter(tmp_path / "dangling")
    path = make_peft_adapter("llama", tmp_path / "a", seed=14)
    (path / WEIGHTS_NAME).unlink()
    (path / WEIGHTS_NAME).symlink_to(path / WEIGHTS_NAME)
    with pytest.raises(AdapterFormatError, match="symbolic link loop"):
        load_adapter(path)


@pytest.mark.parametrize("name", [CONFIG_NAME, WEIGHTS_NAME])
def test_unreadable_file_says_permission_denied(tmp_path, monkeypatch, name):
    import builtins
    import errno
    import os

    from lorablocks.files import adapters

    path = make_peft_adapter("llama", tmp_path / "a", seed=15)
    target = path / name
    if os.geteuid() == 0:  # root reads anything: refuse the open as the kernel would for a user

        def deny(file, *args, **kwargs):
            if os.fspath(file) == str(target):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))
            return builtins.open(file, *args, **kwargs)

        monkeypatch.setattr(adapters, "open", deny, raising=False)
    else:
        target.chmod(0)
    with pytest.raises(AdapterFormatError) as info:
        load_adapter(path)
    msg = str(info.value)
    assert "Permission denied" in msg and str(target) in msg and "No such file" not in msg
