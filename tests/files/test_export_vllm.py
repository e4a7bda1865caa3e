"""vLLM export: one rank, scale 1, no patterns, only module types vLLM loads; checked the way vLLM's
loader reads a folder (``PEFTHelper`` keeps ``r``/``lora_alpha``/``use_rslora`` and drops the patterns, so
every module is scaled by ``lora_alpha / r``), against PEFT's own merge of the original adapter."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lorablocks.cli import run_app
from lorablocks.compose import operations
from lorablocks.files.export_vllm import export_vllm
from tests.files.test_export_gguf import peft_deltas
from tests.tiny_models import make_peft_adapter

torch.set_num_threads(1)


def vllm_deltas(folder) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """module -> dense delta as vLLM applies it (one scale ``lora_alpha / r`` for all), and the ranks found."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    t = load_file(str(folder / "adapter_model.safetensors"))
    deltas, ranks = {}, {}
    for key, a in t.items():
        if ".lora_A." in key:
            b = t[key.replace(".lora_A.", ".lora_B.")].double()
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            deltas[module], ranks[module] = scale * b @ a.double(), a.shape[0]
    return deltas, ranks


def check_config(folder, rank: int) -> dict:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] == rank and cfg["lora_alpha"] == rank and not cfg.get("use_rslora")
    assert not cfg.get("rank_pattern") and not cfg.get("alpha_pattern")  # vLLM would ignore them silently
    assert not cfg.get("modules_to_save") and not cfg.get("use_dora") and cfg.get("bias", "none") == "none"
    return cfg


def test_lower_ranks_padded_exactly(tmp_path, tiny_model_dirs):
    llama = tiny_model_dirs["llama"]
    a = make_peft_adapter("llama", tmp_path / "a", seed=1, r=4, alpha=8.0, rank_pattern={"k_proj": 2},
                          alpha_pattern={"k_proj": 3.0})
    result = export_vllm(a, tmp_path / "v", max_lora_rank=16)
    assert (result.rank, result.padded, result.truncated, result.rel_error) == (4, 2, 0, 0.0)
    check_config(tmp_path / "v", 4)
    got, ranks = vllm_deltas(tmp_path / "v")
    assert set(ranks.values()) == {4}
    k = load_file(str(tmp_path / "v" / "adapter_model.safetensors"))
    pad = k["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"][2:]
    assert torch.equal(pad, torch.zeros_like(pad))
    ref = peft_deltas(llama, a)
    assert set(got) == set(ref)
    for m, d in ref.items():
        assert d.abs().max() > 0.1
        torch.testing.assert_close(got[m], d, rtol=1e-5, atol=1e-6)
    rec = json.loads((tmp_path / "v" / "lorablocks.json").read_text())
    assert rec["format"] == "vllm" and rec["fingerprint"] == result.fingerprint
    # the original folder read the vLLM way is wrong: the reason for the export
    wrong, _ = vllm_deltas(a)
    k0 = "model.layers.0.self_attn.k_proj"
    assert not torch.allclose(wrong[k0], ref[k0], atol=1e-3)


def test_higher_ranks_truncated_with_the_error_reported(tmp_path, tiny_model_dirs):
    llama = tiny_model_dirs["llama"]
    a = make_peft_adapter("llama", tmp_path / "a", seed=2, r=6, alpha=6.0)
    b = make_peft_adapter("llama", tmp_path / "b", seed=3, r=6, alpha=12.0, use_rslora=True)
    ab = tmp_path / "ab"
    operations.combine_files([a, b], ab, operations.CombineRequest(weights=[1.0, 0.5], rank="concat"))
    result = export_vllm(ab, tmp_path / "v", max_lora_rank=8)
    assert result.rank == 8 and result.truncated == 10 and result.padded == 0
    check_config(tmp_path / "v", 8)
    got, ranks = vllm_deltas(tmp_path / "v")
    assert set(ranks.values()) == {8}
    da, db = peft_deltas(llama, a), peft_deltas(llama, b)
    dropped = total = 0.0
    for m in da:
        want = da[m] + 0.5 * db[m]
        s = torch.linalg.svdvals(want)
        u, sv, vh = torch.linalg.svd(want)
        best = u[:, :8] @ torch.diag(sv[:8]) @ vh[:8]  # Eckart-Young: the best rank-8 approximation
        torch.testing.assert_close(got[m], best, rtol=1e-4, atol=1e-5)
        dropped, total = dropped + float((s[8:] ** 2).sum()), total + float((s ** 2).sum())
    assert result.rel_error > 0.01
    assert result.rel_error == pytest.approx(math.sqrt(dropped / total), rel=1e-4)


def run(argv, capsys):
    code = run_app([str(x) for x in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_prints_the_vllm_serve_line(tmp_path, capsys):
    a = make_peft_adapter("llama", tmp_path / "a", seed=4, r=4)
    code, out, err = run(["export", a, "--format", "vllm", "--out", tmp_path / "math-vllm", "--max-lora-rank", "8"],
                         capsys)
    assert code == 0, err
    assert "10 modules at rank 4 (exact)" in err
    assert out.strip() == f"vllm serve MODEL --enable-lora --max-lora-rank 8 --lora-modules math-vllm={tmp_path / 'math-vllm'}"


def test_cli_never_writes_over_its_input(tmp_path, capsys):
    a = make_peft_adapter("llama", tmp_path / "a", seed=8)
    before = {p.name: p.read_bytes() for p in a.iterdir()}
    code, _, err = run(["export", a, "--format", "vllm", "--out", a, "--force"], capsys)
    assert code == 2 and "input" in err and len(err.strip().splitlines()) == 1, err
    assert {p.name: p.read_bytes() for p in a.iterdir()} == before


@pytest.mark.parametrize("case", ["gpt2", "lm_head", "dora", "rank-12", "model-flag", "exists"])
def test_cli_refusals_one_line_exit_2(tmp_path, capsys, case):
    llama = make_peft_adapter("llama", tmp_path / "a", seed=5)
    (tmp_path / "exists").mkdir()
    argv = {"gpt2": [make_peft_adapter("gpt2", tmp_path / "g", seed=6)],
            "lm_head": [make_peft_adapter("llama", tmp_path / "h", seed=7, target_modules=["q_proj", "lm_head"])],
            "dora": [make_peft_adapter("llama", tmp_path / "d", seed=9, use_dora=True)],
            "rank-12": [llama, "--max-lora-rank", "12"],
            "model-flag": [llama, "--model", "smollm2-135m"],
            "exists": [llama]}[case]
    out = tmp_path / ("exists" if case == "exists" else "v")
    code, _, err = run(["export", *argv, "--format", "vllm", "--out", out], capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    expected = {"gpt2": "fan_in_fan_out", "lm_head": "lm_head", "dora": "DoRA", "rank-12": "--max-lora-rank", "model-flag": "--model",
                "exists": "exists"}[case]
    assert expected in err
    assert case == "exists" or not out.exists()
