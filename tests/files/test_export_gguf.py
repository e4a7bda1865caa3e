"""GGUF export for llama.cpp, read back with the gguf package's own reader (``gguf.GGUFReader``).

References are independent of the exporter: PEFT's own merge (``merge_and_unload``) gives the dense deltas,
the Q/K reorder is checked against a hand-indexed permutation and against the two RoPE conventions.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from lorablocks.cli import run_app
from lorablocks.compose import operations
from lorablocks.files.export_gguf import export_adapter_gguf, export_model_gguf, gguf_record
from lorablocks.files.llama_gguf import permute_rows, unpermute_rows
from tests.tiny_models import make_peft_adapter

torch.set_num_threads(1)

# the tiny Llama: hidden 32, 4 heads of 8, 2 KV heads, 2 layers
N_HEAD, N_KV, HEAD_DIM = 4, 2, 8
GG = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "down_proj": "ffn_down",
      "gate_proj": "ffn_gate", "up_proj": "ffn_up"}


def peft_deltas(model_dir, adapter) -> dict[str, torch.Tensor]:
    """module -> dense delta (float64) as PEFT itself applies the adapter (merge_and_unload minus base)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    return {k.removesuffix(".weight"): v - before[k] for k, v in merged.state_dict().items()
            if not torch.equal(v, before[k])}


def hand_permuted(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order by explicit indices: in each head, row i of the first half goes to 2i, row i of
    the second half to 2i + 1."""
    d = w.shape[0] // n_head
    out = torch.empty_like(w)
    for h in range(n_head):
        for i in range(d // 2):
            out[h * d + 2 * i] = w[h * d + i]
            out[h * d + 2 * i + 1] = w[h * d + d // 2 + i]
    return out


def gguf_name(module: str) -> str:
    layer, kind = module.split(".")[2], module.rsplit(".", 1)[-1]
    return f"blk.{layer}.{GG[kind]}.weight"


def llama_cpp_deltas(path) -> dict[str, torch.Tensor]:
    """GGUF tensor -> the delta llama.cpp applies at adapter scale 1: ``alpha / r_m * B @ A``, r_m = B's columns."""
    reader = gguf.GGUFReader(str(path))
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    t = {x.name: torch.from_numpy(np.array(x.data)).double() for x in reader.tensors}
    return {n[: -len(".lora_a")]: alpha / t[n[:-1] + "b"].shape[1] * t[n[:-1] + "b"] @ t[n]
            for n in t if n.endswith(".lora_a")}


def expected_gguf(delta: torch.Tensor, module: str) -> torch.Tensor:
    kind = module.rsplit(".", 1)[-1]
    return hand_permuted(delta, N_HEAD if kind == "q_proj" else N_KV) if kind in ("q_proj", "k_proj") else delta


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dirs):
    return tiny_model_dirs["llama"]


def test_permutation_is_llama_cpp_rope_order():
    """transformers' RoPE on rows (rotate_half) equals llama.cpp's interleaved-pair RoPE on the reordered rows."""
    d, n_head, base = HEAD_DIM, 3, 10000.0
    q = torch.randn(n_head * d, dtype=torch.float64)
    theta = 7 * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # position 7
    cos, sin = torch.cat([theta.cos(), theta.cos()]), torch.cat([theta.sin(), theta.sin()])
    heads = q.view(n_head, d)
    hf = heads * cos + torch.cat([-heads[:, d // 2:], heads[:, : d // 2]], 1) * sin  # rotate_half
    pairs = permute_rows(q, n_head).view(n_head, d // 2, 2)
    x, y = pairs[..., 0], pairs[..., 1]
    ll = torch.stack([x * theta.cos() - y * theta.sin(), x * theta.sin() + y * theta.cos()], -1)  # ROPE_NORM
    torch.testing.assert_close(ll.reshape(-1), permute_rows(hf.reshape(-1), n_head), rtol=0, atol=1e-12)
    w = torch.randn(n_head * d, 5)
    assert torch.equal(permute_rows(w, n_head), hand_permuted(w, n_head))
    assert not torch.equal(permute_rows(w, n_head), w)
    assert torch.equal(unpermute_rows(permute_rows(w, n_head), n_head), w)


def test_adapter_gguf_metadata_names_shapes_and_delta(tmp_path, llama_dir):
    a = make_peft_adapter("llama", tmp_path / "a", seed=1, r=4, alpha=8.0)
    result = export_adapter_gguf(a, tmp_path / "a.gguf", model=str(llama_dir))
    reader = gguf.GGUFReader(str(result.path))
    kv = {k: f.contents() for k, f in reader.fields.items()}
    assert (kv["general.type"], kv["general.architecture"], kv["adapter.type"]) == ("adapter", "llama", "lora")
    assert kv["adapter.lora.alpha"] == 4.0  # the rank: scale 8/4 = 2 folded into A
    assert kv["lorablocks.kind"] == "gguf-adapter" and kv["lorablocks.fingerprint"].startswith("sha256:")
    assert json.loads(kv["lorablocks.record"])["fingerprint"] == kv["lorablocks.fingerprint"]
    # a block's fingerprint covers its config's scales, not only its weights file
    cfg = json.loads((a / "adapter_config.json").read_text())
    (a / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 16.0}))
    other = export_adapter_gguf(a, tmp_path / "a16.gguf", model=str(llama_dir))
    assert other.fingerprint != result.fingerprint
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    names = {t.name for t in reader.tensors}
    modules = [f"model.layers.{i}.{p}.{m}" for i in range(2) for p, ms in
               (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("down_proj",))) for m in ms]
    assert names == {gguf_name(m) + s for m in modules for s in (".lora_a", ".lora_b")}
    ref = peft_deltas(llama_dir, a)
    for t in reader.tensors:
        m = next(m for m in modules if t.name.startswith(gguf_name(m)))
        out, inp = ref[m].shape
        # numpy (r, in) / (out, r), i.e. GGUF ne [in, r] / [r, out] as convert_lora_to_gguf writes them
        assert t.data.shape == ((4, inp) if t.name.endswith("lora_a") else (out, 4))
        assert list(t.shape) == list(t.data.shape[::-1]) and t.tensor_type == gguf.GGMLQuantizationType.F32
    got = llama_cpp_deltas(result.path)
    for m in modules:
        assert ref[m].abs().max() > 0.1
        torch.testing.assert_close(got[gguf_name(m)], expected_gguf(ref[m], m), rtol=1e-5, atol=1e-6)
    q = "model.layers.0.self_attn.q_proj"
    assert not torch.allclose(got[gguf_name(q)], ref[q], atol=1e-3)  # the reorder did happen


def test_composition_with_mixed_ranks_scales_folds_exactly(tmp_path, llama_dir):
    """Two blocks with different r, alpha, rsLoRA and rank_pattern, weighted 0.7 and -0.4: llama.cpp's
    per-module alpha / r_m reproduces the weighted sum of PEFT's own deltas."""
    a = make_peft_adapter("llama", tmp_path / "a", seed=2, r=4, alpha=8.0, rank_pattern={"k_proj": 2},
                          alpha_pattern={"k_proj": 6.0})
    b = make_peft_adapter("llama", tmp_path / "b", seed=3, r=3, alpha=5.0, use_rslora=True,
                          target_modules=["q_proj", "v_proj", "up_proj"])
    combined = tmp_path / "ab"
    operations.combine_files([a, b], combined, operations.CombineRequest(weights=[0.7, -0.4], rank="concat"))
    result = export_adapter_gguf(combined, tmp_path / "ab.gguf", model=str(llama_dir))
    reader = gguf.GGUFReader(str(result.path))
    ranks = {t.name: t.data.shape[1] for t in reader.tensors if t.name.endswith("lora_b")}
    assert len(set(ranks.values())) > 1  # per-module ranks differ: the alpha convention is exercised
    rec = json.loads(reader.fields["lorablocks.record"].contents())
    made = json.loads((combined / "lorablocks.json").read_text())
    assert result.fingerprint == rec["fingerprint"] == made.get("recipe", made)["fingerprint"]
    da, db = peft_deltas(llama_dir, a), peft_deltas(llama_dir, b)
    got = llama_cpp_deltas(result.path)
    assert set(got) == {gguf_name(m) for m in set(da) | set(db)}
    for m in set(da) | set(db):
        want = 0.7 * da.get(m, 0) - 0.4 * db.get(m, 0)
        torch.testing.assert_close(got[gguf_name(m)], expected_gguf(want, m), rtol=1e-5, atol=1e-6)


def test_f16_outtype(tmp_path, llama_dir):
    a = make_peft_adapter("llama", tmp_path / "a", seed=4, r=4, alpha=4.0)
    result = export_adapter_gguf(a, tmp_path / "a.gguf", model=str(llama_dir), outtype="f16")
    reader = gguf.GGUFReader(str(result.path))
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F16}
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_F16)
    ref = peft_deltas(llama_dir, a)
    got = llama_cpp_deltas(result.path)
    for m, d in ref.items():
        torch.testing.assert_close(got[gguf_name(m)], expected_gguf(d, m), rtol=2e-2, atol=2e-3)


def reference_gguf(path, model_dir) -> None:
    """A stand-in for a base model's own GGUF: llama metadata, a toy tokenizer, the model's tensor names."""
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_block_count(2)
    w.add_embedding_length(32)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(300)])
    w.add_chat_template("{{ messages }}")
    for k, v in state.items():
        name = tmap.get_name(k, try_suffixes=(".weight",))
        if name != "output.weight":  # tied
            w.add_tensor(name, np.zeros(v.shape, np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


def test_model_gguf_is_merged_permuted_and_keeps_reference_metadata(tmp_path, llama_dir):
    from safetensors.torch import load_file

    ref_path = tmp_path / "base.gguf"
    reference_gguf(ref_path, llama_dir)
    a = make_peft_adapter("llama", tmp_path / "a", seed=5, r=4, alpha=8.0)
    result = export_model_gguf(a, tmp_path / "m.gguf", model=str(llama_dir), outtype="f32", base_gguf=ref_path)
    reader = gguf.GGUFReader(str(result.path))
    kv = {k: f.contents() for k, f in reader.fields.items()}
    assert kv["general.type"] == "model" and kv["tokenizer.ggml.tokens"][:2] == ["t0", "t1"]
    assert kv["tokenizer.chat_template"] == "{{ messages }}" and kv["lorablocks.kind"] == "gguf-model"
    assert [t.name for t in reader.tensors] == [t.name for t in gguf.GGUFReader(str(ref_path)).tensors]
    base = {k: v.double() for k, v in load_file(str(llama_dir / "model.safetensors")).items()}
    delta = peft_deltas(llama_dir, a)
    tensors = {t.name: torch.from_numpy(np.array(t.data)).double() for t in reader.tensors}
    for m, d in delta.items():
        want = expected_gguf(base[m + ".weight"] + d, m)
        torch.testing.assert_close(tensors[gguf_name(m)], want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tensors["token_embd.weight"], base["model.embed_tokens.weight"], rtol=0, atol=0)
    assert reader.tensors[[t.name for t in reader.tensors].index("blk.0.attn_norm.weight")].tensor_type == 0


def run(argv, capsys):
    code = run_app([str(x) for x in argv])
    return code, capsys.readouterr().err


def test_cli_gguf_and_force_replaces_only_its_own(tmp_path, llama_dir, capsys):
    a = make_peft_adapter("llama", tmp_path / "a", seed=6)
    out = tmp_path / "a.gguf"
    code, err = run(["export", a, "--format", "gguf", "--model", llama_dir, "--out", out], capsys)
    assert code == 0, err
    assert "adapter.lora.alpha 4" in err and gguf_record(out)["kind"] == "gguf-adapter"
    code, err = run(["export", a, "--format", "gguf", "--model", llama_dir, "--out", out], capsys)
    assert code == 2 and "exists" in err and len(err.strip().splitlines()) == 1
    assert run(["export", a, "--format", "gguf", "--model", llama_dir, "--out", out, "--force"], capsys)[0] == 0
    foreign = tmp_path / "user.gguf"
    foreign.write_bytes(b"GGUF not ours")
    code, err = run(["export", a, "--format", "gguf", "--model", llama_dir, "--out", foreign, "--force"], capsys)
    assert code == 2 and "not a GGUF file lorablocks wrote" in err
    assert foreign.read_bytes() == b"GGUF not ours"


def test_cli_never_writes_over_an_input(tmp_path, llama_dir, capsys):
    a = make_peft_adapter("llama", tmp_path / "a", seed=9)
    before = {p.name: p.read_bytes() for p in a.iterdir()}
    for out in (a, a / "adapter_model.safetensors"):
        code, err = run(["export", a, "--format", "gguf", "--model", llama_dir, "--out", out, "--force"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert {p.name: p.read_bytes() for p in a.iterdir()} == before


@pytest.mark.parametrize("case", ["gpt2-adapter", "gpt2-model", "bad-format", "missing", "hub-model", "no-base-gguf"])
def test_cli_bad_inputs_one_line_exit_2(tmp_path, tiny_model_dirs, capsys, case):
    llama = make_peft_adapter("llama", tmp_path / "a", seed=7)
    argv = {
        "gpt2-adapter": [make_peft_adapter("gpt2", tmp_path / "g", seed=8), "--format", "gguf", "--model",
                         tiny_model_dirs["llama"]],
        "gpt2-model": [llama, "--format", "gguf", "--model", tiny_model_dirs["gpt2"]],
        "bad-format": [llama, "--format", "onnx"],
        "missing": [tmp_path / "nope", "--format", "gguf", "--model", tiny_model_dirs["llama"]],
        "hub-model": [llama, "--format", "gguf", "--model", "someone/some-model"],
        "no-base-gguf": [llama, "--format", "gguf-model", "--model", tiny_model_dirs["llama"]],
    }[case]
    code, err = run(["export", *argv, "--out", tmp_path / "x.gguf"], capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x.gguf").exists()


def test_cli_recorded_base_model_is_checked(tmp_path, llama_dir, capsys):
    a = make_peft_adapter("llama", tmp_path / "a", seed=10)
    cfg = json.loads((a / "adapter_config.json").read_text())
    (a / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "someone/other-model"}))
    argv = ["export", a, "--format", "gguf", "--model", llama_dir, "--out", tmp_path / "a.gguf"]
    code, err = run(argv, capsys)
    assert code == 2 and "--allow-base-mismatch" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a.gguf").exists()
    assert run([*argv, "--allow-base-mismatch"], capsys)[0] == 0
