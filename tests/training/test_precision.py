"""Precision: one setting, one decision (fallback where bf16 is not native), bf16 autocast around the forward
only (LoRA factors and optimizer state stay float32), a bf16 run close to the fp32 one."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from lorablocks.errors import ConfigError
from lorablocks.study.config import load_config as load_study_config
from lorablocks.training import precision as prec
from lorablocks.training.config import OptimSettings, TrainConfig, load_config
from lorablocks.training.loss import AnswerNLL
from lorablocks.training.train import RECORD_NAME, train_adapter
from tests.conftest import tiny_llama


def _native(monkeypatch, ok: bool) -> None:
    monkeypatch.setattr(prec, "native_bf16", lambda device_type: (ok, "test says so"))


def _cfg(model_dir, data, out, **kw):
    base = dict(model=str(model_dir), data=[str(data)], out=str(out), max_steps=6, batch_size=4, learning_rate=5e-3,
                warmup_steps=2, eval_every=3, val_limit=6, checkpoint_every=0)
    return TrainConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------ decision


def test_without_native_bf16_auto_is_fp32_silently_and_bf16_falls_back_with_one_line(monkeypatch, caplog):
    _native(monkeypatch, False)
    with caplog.at_level(logging.WARNING, logger="lorablocks.precision"):
        auto = prec.resolve_precision("auto", "cpu")
        assert auto.name == "fp32" and auto.dtype is None and "no native bf16" in auto.reason
        assert not caplog.records  # auto: silent
        asked = prec.resolve_precision("bf16", torch.device("cpu"))
    assert asked.name == "fp32" and asked.setting == "bf16" and asked.dtype is None
    assert [r.getMessage() for r in caplog.records] == [asked.reason]
    assert "bf16 requested" in asked.reason and "using fp32" in asked.reason and "\n" not in asked.reason
    with asked.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_with_native_bf16_auto_and_bf16_autocast_and_fp32_never_does(monkeypatch):
    _native(monkeypatch, True)
    for setting in ("auto", "bf16"):
        r = prec.resolve_precision(setting, "cpu")
        assert r.name == "bf16" and r.dtype is torch.bfloat16 and r.to_dict()["used"] == "bf16"
        with r.autocast():
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") is torch.bfloat16
    assert prec.resolve_precision("fp32", "cpu").name == "fp32"
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        prec.resolve_precision("fp16", "cpu")


def test_native_detection_reads_the_cpu_flags(monkeypatch):
    for flags, expected in ((("fpu", "avx512f", "avx512_bf16"), True), (("amx_tile", "amx_bf16"), True),
                            (("fpu", "avx2", "avx512f"), False), (("fp", "asimd", "bf16"), True)):
        monkeypatch.setattr(prec, "_cpu_flags", lambda flags=flags: frozenset(flags))
        ok, why = prec.native_bf16("cpu")
        assert ok is expected and why, flags
    # no /proc/cpuinfo (another OS): torch's own checks decide
    monkeypatch.setattr(prec, "_cpu_flags", lambda: frozenset())
    for answer in (True, False):
        monkeypatch.setattr(prec, "_torch_cpu_bf16", lambda answer=answer: answer)
        assert prec.native_bf16("cpu")[0] is answer
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert prec.native_bf16("cuda") == (False, "CUDA is not available")
    assert prec.native_bf16("mps")[0] is False


# -------------------------------------------------------------------------------------------- config


def test_config_accepts_the_three_values_and_refuses_others():
    assert TrainConfig().precision == "auto" and OptimSettings().precision == "auto"
    for value in ("auto", "fp32", "bf16"):
        assert load_config(None, {"data": ["a"], "out": "o", "precision": value}).precision == value
    with pytest.raises(ConfigError) as exc:
        load_config(None, {"data": ["a"], "out": "o", "precision": "fp16"})
    assert "precision must be 'auto', 'fp32' or 'bf16', got 'fp16'" in str(exc.value)
    with pytest.raises(ConfigError, match="unknown setting 'mixed_precision'"):  # replaced by precision
        load_config(None, {"data": ["a"], "out": "o", "mixed_precision": "bf16"})
    # the study's train section is the same declaration
    assert load_study_config(preset="smoke", overrides={"train": {"precision": "fp32"}}).train.precision == "fp32"
    with pytest.raises(ConfigError, match="train.precision must be 'auto', 'fp32' or 'bf16'"):
        load_study_config(preset="smoke", overrides={"train": {"precision": "half"}})


# --------------------------------------------------------------------------------------------- loss


def test_head_and_attention_stay_float32_under_bf16(tok):
    """Measuring (no gradient), the loss's head runs outside autocast (training keeps it under autocast); on
    a CPU, attention takes float32 inputs for the duration of ``attention()`` (transformers' own switch,
    undone after; no change without bf16 or off the CPU)."""
    from transformers.integrations import sdpa_attention

    model = tiny_llama(len(tok))
    heads, attn = [], []
    model.lm_head.register_forward_hook(lambda mod, inp, out: heads.append(out.dtype))
    real = sdpa_attention.sdpa_attention_forward
    spy = lambda module, q, *a, **kw: attn.append(q.dtype) or real(module, q, *a, **kw)  # noqa: E731
    ids = torch.tensor([tok("Question: what is two plus three? Answer: five.")["input_ids"]])
    mask, targets = torch.ones_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    targets[0, 3:-1] = True
    loss = AnswerNLL(model)
    with torch.no_grad():
        ref, _ = loss(ids, mask, targets)
    bf16 = prec.ResolvedPrecision("bf16", "bf16", "cpu", "test")
    sdpa_attention.sdpa_attention_forward = spy
    try:
        with bf16.attention(model), torch.no_grad():
            assert model.config._attn_implementation == prec.FP32_SDPA
            same, _ = loss(ids, mask, targets)  # float32 outside autocast: bit for bit
            with bf16.autocast():
                kept, _ = loss(ids, mask, targets)
        with bf16.attention(model), bf16.autocast():
            trained, _ = loss(ids, mask, targets)
    finally:
        sdpa_attention.sdpa_attention_forward = real
    assert model.config._attn_implementation == "sdpa"
    assert heads == [torch.float32] * 3 + [torch.bfloat16] and attn == [torch.float32] * 6  # 2 layers x 3 passes
    assert torch.equal(same, ref) and kept.dtype == trained.dtype == torch.float32
    assert torch.allclose(kept, ref, rtol=2e-2) and torch.allclose(trained, ref, rtol=5e-2)
    trained.sum().backward()  # the gradient flows through the bf16 head into float32 parameters
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    for other in (prec.ResolvedPrecision("fp32", "fp32", "cpu", "t"), prec.ResolvedPrecision("bf16", "bf16", "cuda", "t")):
        with other.attention(model):
            assert model.config._attn_implementation == "sdpa"


# ------------------------------------------------------------------------------------------ training


def test_bf16_training_keeps_lora_and_optimizer_float32_and_lands_near_fp32(tiny_model_dirs, domains, tmp_path,
                                                                            monkeypatch):
    """Forced bf16 (emulated where the CPU lacks it): the forward runs in bf16, every trained tensor and
    optimizer state stays float32, the adapter is trained, differs from the fp32 one, and is close to it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _native(monkeypatch, True)
    m = tiny_model_dirs["llama"]
    model, tok = AutoModelForCausalLM.from_pretrained(m), AutoTokenizer.from_pretrained(m)
    out_dtypes = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda mod, i, o: out_dtypes.append(o.dtype))
    runs = {}
    for p in ("fp32", "bf16"):
        cfg = _cfg(m, domains["math"], tmp_path / p, precision=p, checkpoint_every=4, keep_checkpoints=True,
                   statistics=False)  # the statistics pass after training runs in float32 by design
        runs[p] = train_adapter(cfg, model=model, tokenizer=tok, progress=False).record
        step = cfg.checkpoint_path / "step-0000004"
        lora, optim = load_file(str(step / "lora.safetensors")), load_file(str(step / "optimizer.safetensors"))
        assert lora and all(t.dtype == torch.float32 for t in lora.values()), p
        assert {k.split(".", 1)[1] for k in optim} >= {"exp_avg", "exp_avg_sq"}
        assert all(t.dtype == torch.float32 for t in optim.values()), p
        assert out_dtypes[-1] == {"fp32": torch.float32, "bf16": torch.bfloat16}[p]  # a base projection's output
    assert model.config._attn_implementation == "sdpa"  # the caller's model back as it was
    assert runs["bf16"]["precision"] == {"setting": "bf16", "used": "bf16", "device": "cpu",
                                         "reason": "native bf16 on cpu: test says so"}
    assert json.loads((tmp_path / "fp32" / RECORD_NAME).read_text())["precision"]["used"] == "fp32"
    a, b = (load_file(str(tmp_path / p / "adapter_model.safetensors")) for p in ("fp32", "bf16"))
    assert all(t.dtype == torch.float32 for t in b.values())
    b_factors = [k for k in b if "lora_B" in k]
    assert b_factors and all(float(b[k].abs().sum()) > 0 for k in b_factors)  # trained
    assert any(not torch.equal(a[k], b[k]) for k in a)  # bf16 computed something else ...
    diff = sum(float((a[k] - b[k]).norm() ** 2) for k in b_factors) ** 0.5
    norm = sum(float(a[k].norm() ** 2) for k in b_factors) ** 0.5
    assert diff < 0.1 * norm, (diff, norm)  # ... but close
    fp32_val, bf16_val = runs["fp32"]["validation"][-1]["loss"], runs["bf16"]["validation"][-1]["loss"]
    assert abs(fp32_val - bf16_val) < 0.01, (fp32_val, bf16_val)  # nats


def test_resume_is_refused_where_auto_resolves_differently(tiny_model_dirs, domains, tmp_path, monkeypatch):
    m = tiny_model_dirs["gpt2"]
    _native(monkeypatch, False)  # auto -> fp32
    first = _cfg(m, domains["math"], tmp_path / "a", max_steps=4, checkpoint_every=2, keep_checkpoints=True,
                 checkpoint_dir=str(tmp_path / "ck"), val_limit=0)
    train_adapter(first, progress=False)
    _native(monkeypatch, True)  # the same setting now means bf16
    again = first.model_copy(update={"out": str(tmp_path / "b"), "resume": True, "max_steps": 4})
    with pytest.raises(ConfigError, match="precision_used='fp32' \\(now 'bf16'\\)"):
        train_adapter(again, progress=False)


def test_bf16_resume_equals_uninterrupted(tiny_model_dirs, domains, tmp_path, monkeypatch):
    from lorablocks.training import train as train_mod

    _native(monkeypatch, True)
    m = tiny_model_dirs["llama"]
    full = train_adapter(_cfg(m, domains["words"], tmp_path / "full", precision="bf16"), progress=False)
    real_save = train_mod._save_checkpoint

    def save_then_crash(*args, **kw):
        real_save(*args, **kw)
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(train_mod, "_save_checkpoint", save_then_crash)
    cfg = _cfg(m, domains["words"], tmp_path / "part", precision="bf16", checkpoint_every=4)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(cfg, progress=False)
    monkeypatch.setattr(train_mod, "_save_checkpoint", real_save)
    part = train_adapter(cfg.model_copy(update={"resume": True}), progress=False)
    assert part.record["resumed_from"].endswith("step-0000004")
    a, b = (load_file(str(tmp_path / p / "adapter_model.safetensors")) for p in ("full", "part"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert full.record["validation"] == part.record["validation"]


# ------------------------------------------------------------------------------------------ evaluation


def test_evaluation_in_bf16_agrees_with_fp32_and_auto_without_native_is_fp32(tok, monkeypatch):
    from lorablocks.training.data import Example
    from lorablocks.passes.evaluate import evaluate_perplexity, prepare_eval_set
    from tests.conftest import make_examples

    model = tiny_llama(len(tok))
    rows = {d: [Example(r["id"], r["question"], r["answer"]) for r in make_examples(d, 8)] for d in ("math", "words")}
    es = prepare_eval_set(tok, rows, max_length=64, batch_tokens=256)
    ref = evaluate_perplexity(model, es)
    _native(monkeypatch, False)
    auto = evaluate_perplexity(model, es, precision="auto")
    assert auto.per_example == ref.per_example  # fp32: bit for bit
    assert (ref.precision["setting"], ref.precision["used"], auto.precision["used"]) == ("fp32", "fp32", "fp32")
    _native(monkeypatch, True)
    bf16 = evaluate_perplexity(model, es, precision="bf16")
    assert bf16.per_example != ref.per_example and bf16.precision["used"] == "bf16"
    for name in ref.domains:
        assert bf16.domains[name].perplexity == pytest.approx(ref.domains[name].perplexity, rel=5e-3), name
    assert not torch.is_autocast_enabled("cpu") and all(p.dtype == torch.float32 for p in model.parameters())


def test_cli_train_takes_the_precision_flag(tiny_model_dirs, domains, tmp_path, capsys):
    from lorablocks.cli import run_app

    args = ["train", "--model", str(tiny_model_dirs["gpt2"]), "--data", str(domains["math"]), "--max-steps", "2",
            "--batch-size", "2", "--val-limit", "2", "--quiet"]
    assert run_app([*args, "--out", str(tmp_path / "bad"), "--precision", "fp16"]) == 2
    err = capsys.readouterr().err.strip()
    assert "precision must be 'auto', 'fp32' or 'bf16', got 'fp16'" in err and len(err.splitlines()) == 1
    assert run_app([*args, "--out", str(tmp_path / "ok"), "--precision", "fp32"]) == 0
    printed = capsys.readouterr()
    assert "answer tokens/s (fp32)" in " ".join((printed.out + printed.err).split())
    assert json.loads((tmp_path / "ok" / RECORD_NAME).read_text())["precision"]["used"] == "fp32"
