"""Training: schedule, output record, resume == uninterrupted (never unpickling), 2 processes == 1, CLI."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorablocks.training import train as train_mod
from lorablocks.cli import run_app
from lorablocks.training.data import TokenizedExample
from lorablocks.errors import ConfigError, OutputExistsError
from lorablocks.training.train import RECORD_NAME, TrainConfig, batch_schedule, train_adapter

REPO = Path(__file__).resolve().parents[2]


def _cfg(model_dir, data, out, **kw):
    """A short run on a tiny model, in float32 on every machine (bf16 is tested in test_precision.py)."""
    base = dict(model=str(model_dir), data=[str(d) for d in data], out=str(out), max_steps=6, batch_size=4,
                learning_rate=5e-3, warmup_steps=2, eval_every=3, val_limit=6, checkpoint_every=0, precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


def _weights(path):
    return load_file(str(Path(path) / "adapter_model.safetensors"))


# ------------------------------------------------------------------------------------------ schedule


def test_batch_schedule_is_pure_balanced_and_bucketed():
    lengths = [[(i * 7) % 23 + 1 for i in range(10)], [(i * 5) % 17 + 1 for i in range(30)]]
    s1 = batch_schedule([10, 30], lengths, batch_size=4, steps=20, seed=3, window=4)
    assert s1 == batch_schedule([10, 30], lengths, batch_size=4, steps=20, seed=3, window=4)
    assert s1 != batch_schedule([10, 30], lengths, batch_size=4, steps=20, seed=4, window=4)
    assert len(s1) == 20 and all(len(b) == 4 for b in s1)
    counts = Counter(k for b in s1 for k, _ in b)
    assert counts[0] == counts[1] == 40  # balanced: the small domain is repeated, not drowned
    # the small domain cycles through all its examples before repeating one
    first = [i for b in s1 for k, i in b if k == 0]
    assert sorted(first[:10]) == list(range(10)) or len(set(first)) == 10
    for b in s1:  # each batch is sorted by length
        ls = [lengths[k][i] for k, i in b]
        assert ls == sorted(ls)


# -------------------------------------------------------------------------------------------- train


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_train_writes_peft_adapter_and_record(kind, tiny_model_dirs, domains, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorablocks.files.adapters import load_adapter

    out = tmp_path / "ad"
    res = train_adapter(_cfg(tiny_model_dirs[kind], [domains["math"]], out, max_steps=8), progress=False)
    rec = json.loads((out / RECORD_NAME).read_text())
    assert rec["steps"] == 8 and len(rec["loss_curve"]) == 8
    assert [v["step"] for v in rec["validation"]] == [0, 3, 6, 8]
    assert rec["domains"][0]["name"] == "math" and len(rec["domains"][0]["train_sha256"]) == 64
    assert rec["config"]["r"] == 4 and rec["config"]["alpha"] == 64.0 and rec["versions"]["torch"]
    assert rec["targets"] == (["c_attn", "c_proj"] if kind == "gpt2" else
                              ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    # training lowered the loss on this learnable toy domain
    assert rec["validation"][-1]["loss"] < rec["validation"][0]["loss"]
    assert not Path(f"{out}.checkpoints").exists()
    # a PEFT adapter that lorablocks and PEFT both read
    ad = load_adapter(out)
    assert ad.base_model == str(Path(tiny_model_dirs[kind]).resolve())
    assert all(float(x.B.abs().sum()) > 0 for x in ad.delta.values())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[kind])
    PeftModel.from_pretrained(base, str(out))
    # an existing output is refused before any work
    with pytest.raises(OutputExistsError):
        train_adapter(_cfg(tiny_model_dirs[kind], [domains["math"]], out), progress=False)
    assert res.final_train_loss == rec["loss_curve"][-1]["loss"]


def test_training_is_deterministic_and_seeded(tiny_model_dirs, domains, tmp_path):
    m = tiny_model_dirs["llama"]
    train_adapter(_cfg(m, [domains["words"]], tmp_path / "a", val_limit=0), progress=False)
    train_adapter(_cfg(m, [domains["words"]], tmp_path / "b", val_limit=0), progress=False)
    train_adapter(_cfg(m, [domains["words"]], tmp_path / "c", val_limit=0, seed=1), progress=False)
    a, b, c = _weights(tmp_path / "a"), _weights(tmp_path / "b"), _weights(tmp_path / "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


class _Payload:
    """Unpickling this creates ``path``: a harmless stand-in for code run from a planted pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _plant_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"optimizer": _Payload(marker)}))


def test_resume_equals_uninterrupted(tiny_model_dirs, domains, tmp_path, monkeypatch, caplog):
    m = tiny_model_dirs["gpt2"]
    data = [domains["math"], domains["words"]]
    full = train_adapter(_cfg(m, data, tmp_path / "full", max_steps=9, checkpoint_every=4), progress=False)

    real_save = train_mod._save_checkpoint

    def save_then_crash(folder, step, *args, **kw):
        real_save(folder, step, *args, **kw)
        if step == 4:
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(train_mod, "_save_checkpoint", save_then_crash)
    cfg = _cfg(m, data, tmp_path / "part", max_steps=9, checkpoint_every=4)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(cfg, progress=False)
    assert not (tmp_path / "part").exists()  # nothing half-written
    ckpt = tmp_path / "part.checkpoints" / "step-0000004"
    assert sorted(p.suffix for p in ckpt.iterdir()) == [".json", ".safetensors", ".safetensors", ".safetensors"]
    monkeypatch.setattr(train_mod, "_save_checkpoint", real_save)
    # pickles planted in the checkpoint folder (as in a shared study folder) are never unpickled: one beside
    # the real checkpoint, and a newer "checkpoint" in the pickle format of earlier versions, which is skipped
    marker = tmp_path / "pwned"
    _plant_pickle(ckpt / "state.pt", marker)
    newer = ckpt.parent / "step-0000008"
    newer.mkdir()
    _plant_pickle(newer / "state.pt", marker)
    _plant_pickle(newer / "rng-0.pt", marker)

    # a changed setting is refused on resume
    with pytest.raises(ConfigError, match="learning_rate"):
        train_adapter(_cfg(m, data, tmp_path / "part", max_steps=9, checkpoint_every=4, learning_rate=1e-3,
                           resume=True), progress=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lorablocks"):
        resumed = train_adapter(_cfg(m, data, tmp_path / "part", max_steps=9, checkpoint_every=4, resume=True),
                                progress=False)
    assert resumed.record["resumed_from"].endswith("step-0000004")
    assert not marker.exists()
    assert [r.getMessage() for r in caplog.records] == [
        f"ignoring {newer}: not a lorablocks checkpoint (safetensors + JSON); pickled files are never loaded"]
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert [e["loss"] for e in full.record["loss_curve"]] == [e["loss"] for e in resumed.record["loss_curve"]]
    assert full.record["validation"] == resumed.record["validation"]


def test_micro_batches_equal_full_batch(tiny_model_dirs, domains, tmp_path):
    m = tiny_model_dirs["llama"]
    train_adapter(_cfg(m, [domains["words"]], tmp_path / "a", val_limit=0, micro_batch_tokens=0), progress=False)
    train_adapter(_cfg(m, [domains["words"]], tmp_path / "b", val_limit=0, micro_batch_size=1), progress=False)
    train_adapter(_cfg(m, [domains["words"]], tmp_path / "c", val_limit=0, micro_batch_tokens=40), progress=False)
    a, b, c = _weights(tmp_path / "a"), _weights(tmp_path / "b"), _weights(tmp_path / "c")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
        assert torch.allclose(a[k], c[k], rtol=1e-4, atol=1e-6), k
    assert [len(c) for c in train_mod._micro_batches(
        [TokenizedExample(tuple(range(n)), 1) for n in (10, 20, 30, 40, 100)], 8, 64)] == [2, 1, 1, 1]


def test_reusing_a_loaded_model_leaves_it_untouched(tiny_model_dirs, domains, tmp_path):
    from lorablocks.model.models import load_model

    model, tok = load_model(str(tiny_model_dirs["llama"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_adapter(_cfg(tiny_model_dirs["llama"], [domains["math"]], tmp_path / "a", val_limit=0),
                  model=model, tokenizer=tok, progress=False)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    train_adapter(_cfg(tiny_model_dirs["llama"], [domains["math"]], tmp_path / "b", val_limit=0), progress=False)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_torchrun_matches_one_process(tiny_model_dirs, domains, tmp_path):
    """``torchrun --nproc_per_node 2`` (two gloo processes on CPU) trains the same adapter as one process:
    the loss is normalised by the global token count, so the gradient is the same token-weighted mean."""
    torchrun = Path(sys.executable).parent / "torchrun"
    cli = Path(sys.executable).parent / "lorablocks"
    if not torchrun.exists() or not cli.exists():
        pytest.skip("torchrun or the lorablocks script is not installed in this environment")
    args = ["train", "--model", str(tiny_model_dirs["gpt2"]), "--data", str(domains["math"]), str(domains["words"]),
            "--max-steps", "5", "--batch-size", "4", "--lr", "5e-3", "--warmup-steps", "2", "--eval-every", "0",
            "--val-limit", "6", "--checkpoint-every", "0", "--precision", "fp32", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(cli), *args,
                           "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_app([*args, "--out", str(tmp_path / "one")]) == 0
    rec2 = json.loads((tmp_path / "two" / RECORD_NAME).read_text())
    rec1 = json.loads((tmp_path / "one" / RECORD_NAME).read_text())
    assert rec2["processes"] == 2 and rec1["processes"] == 1
    for e1, e2 in zip(rec1["loss_curve"], rec2["loss_curve"]):
        assert e1["answer_tokens"] == e2["answer_tokens"]
        assert e2["loss"] == pytest.approx(e1["loss"], rel=1e-4)
    assert rec2["validation"][-1]["loss"] == pytest.approx(rec1["validation"][-1]["loss"], rel=1e-4)
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5), k


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_train_flags_and_config_file(tiny_model_dirs, domains, tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text(f"model: {tiny_model_dirs['llama']}\nmax_steps: 3\nbatch_size: 2\nval_limit: 2\n")
    out = tmp_path / "o"
    assert run_app(["train", "--config", str(conf), "--data", str(domains["math"]), "--data", str(domains["words"]),
                    "--out", str(out), "--max-steps", "2", "--limit", "10", "--quiet"]) == 0
    rec = json.loads((out / RECORD_NAME).read_text())
    assert rec["steps"] == 2 and rec["config"]["batch_size"] == 2
    assert [d["name"] for d in rec["domains"]] == ["math", "words"]
    assert rec["domains"][0]["train_examples"] == 10


def test_cli_train_bad_inputs(tiny_model_dirs, domains, tmp_path, capsys):
    m = str(tiny_model_dirs["llama"])
    existing = tmp_path / "exists"
    existing.mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"id": "1", "question": "q"}\n')
    cases = [
        (["--model", m, "--out", str(tmp_path / "x")], "data must name at least one domain"),
        (["--model", m, "--data", str(domains["math"]), "--out", str(existing)], "exists"),
        (["--model", m, "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "y")], "does not exist"),
        (["--model", m, "--data", str(bad), "--out", str(tmp_path / "z")], "train.jsonl:1: missing field 'answer'"),
        (["--model", m, "--data", str(domains["math"]), "--out", str(tmp_path / "w"), "--targets", "nope_proj"],
         "nope_proj"),
        (["--model", m, "--data", str(domains["math"]), "--out", str(tmp_path / "v"), "--r", "0", "--lr", "-1"],
         "r must be >= 1"),
        (["--model", str(tmp_path / "nomodel"), "--data", str(domains["math"]), "--out", str(tmp_path / "u")],
         "smollm2-135m"),
    ]
    for args, message in cases:
        rc = run_app(["train", *args, "--quiet"])
        err = " ".join(capsys.readouterr().err.split())
        assert rc != 0, args
        assert "Traceback" not in err
        assert message in err, (args, message, err)


def test_cli_unknown_flag_is_one_line(capsys):
    assert run_app(["train", "--bogus-flag"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_checkpoint_round_trip_without_pickle(tmp_path):
    """Optimizer, scheduler and RNG states survive safetensors + JSON exactly; a corrupt file is one clear error."""
    import random
    from types import SimpleNamespace

    from lorablocks.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    acc = SimpleNamespace(is_main_process=True, process_index=0, num_processes=1, wait_for_everyone=lambda: None)

    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))

    model, opt, sched = make()
    for _ in range(2):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        sched.step()
    save_checkpoint(tmp_path, 2, model, opt, sched, acc, {"step": 2, "note": "x"})
    expected = (torch.rand(3), random.random())
    path, skipped = latest_checkpoint(tmp_path)
    assert path == tmp_path / "step-0000002" and skipped == []
    assert not [p for p in path.iterdir() if p.suffix not in (".json", ".safetensors")]
    model2, opt2, sched2 = make()
    assert load_checkpoint(path, model2, opt2, sched2, acc) == {"step": 2, "note": "x"}
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]  # RNG states restored
    for (k, a), b in zip(opt.state_dict()["state"].items(), opt2.state_dict()["state"].values()):
        assert a.keys() == b.keys() and all(torch.equal(a[x], b[x]) for x in a), k
    assert opt.state_dict()["param_groups"] == opt2.state_dict()["param_groups"]
    assert sched.state_dict() == sched2.state_dict()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    (path / "state.json").write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        load_checkpoint(path, model2, opt2, sched2, acc)


def test_force_never_replaces_a_folder_lorablocks_did_not_make(tmp_path, domains, tiny_model_dirs, capsys):
    from lorablocks.cli import run_app

    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    code = run_app(["train", "--model", str(tiny_model_dirs["llama"]), "--data", str(domains["math"]), "--out", str(mine),
                    "--max-steps", "1", "--force", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "did not make" in err
    assert (mine / "notes.txt").read_text() == "precious"
    code = run_app(["train", "--model", str(tiny_model_dirs["llama"]), "--data", str(domains["math"]),
                    "--out", str(domains["math"]), "--max-steps", "1", "--force", "--quiet"])
    assert code == 2 and (domains["math"] / "train.jsonl").is_file()
