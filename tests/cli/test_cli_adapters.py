"""The adapter verbs end to end, and every bad input: one clear line, non-zero exit, nothing written."""

from __future__ import annotations

import json
from pathlib import Path
import subprocess
import sys

import pytest
import torch

from lorablocks.core import algebra
from lorablocks.files.adapters import WEIGHTS_NAME, load_adapter
from lorablocks.cli import run_app
from tests.tiny_models import make_peft_adapter

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [make_peft_adapter("llama", root / f"d{i}", seed=10 + i, r=2 + i) for i in range(3)]


def run(argv, capsys):
    code = run_app([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_combine_subtract_roundtrip(tmp_path, adapters, capsys):
    a, b, c = adapters
    code, _, err = run(["combine", a, b, c, "--weights", "1,1,1", "--out", tmp_path / "abc"], capsys)
    assert code == 0, err
    assert "total rank" in err
    code, _, err = run(["subtract", tmp_path / "abc", c, "--out", tmp_path / "ab"], capsys)
    assert code == 0, err
    ab = load_adapter(tmp_path / "ab")
    da, db = load_adapter(a).delta, load_adapter(b).delta
    for m, x in ab.delta.items():
        assert x.rank == 2 + 3  # the subtracted rank disappeared
        want = algebra.to_dense(da[m], torch.float64) + algebra.to_dense(db[m], torch.float64)
        assert torch.allclose(algebra.to_dense(x, torch.float64), want, atol=1e-5)


def test_combine_truncated_rank_reports_error(tmp_path, adapters, capsys):
    code, _, err = run(["combine", *adapters, "--rank", "2", "--out", tmp_path / "r2"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "r2" / "lorablocks.json").read_text())
    assert record["recipe"]["rank"] == 2 and record["kind"] == "adapter"
    assert 0 < record["truncation"]["overall_rel_error"] < 1
    assert all(m["rank_out"] == 2 for m in record["truncation"]["modules"].values())


def test_similarity_json_and_plot(tmp_path, adapters, capsys):
    code, _, err = run(["similarity", *adapters, "--json", tmp_path / "s.json", "--plot", tmp_path / "s.png"], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "s.json").read_text())
    assert len(rep["rms_cosine"]) == 3 and len(rep["mean_cosine"][0]) == 3
    assert rep["rms_cosine"][0][0] == 1.0 and 0 < rep["rms_cosine"][0][1] < 1
    assert set(rep["pairs"][0]["modules"]) == set(load_adapter(adapters[0]).delta)
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_inspect_json(adapters, capsys):
    code, out, _ = run(["inspect", adapters[1], "--json"], capsys)
    assert code == 0
    rep = json.loads(out)
    assert rep["r"] == 3 and rep["n_modules"] == 10
    m = next(iter(rep["modules"].values()))
    assert m["rank"] == 3 and 1 <= m["effective_rank"] <= 3 and m["norm"] > 0


def _corrupt_copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    w = dst / WEIGHTS_NAME
    w.write_bytes(w.read_bytes()[:100])
    return dst


def _other_model(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    pm = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "other")
    return tmp_path / "other"


def _plain_folder(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("not an adapter")
    return path


@pytest.mark.parametrize(
    "case,expect",
    [
        ("missing", "does not exist"),
        ("not_adapter", "not a LoRA adapter"),
        ("corrupt", "corrupt or truncated"),
        ("shapes", "different base models"),
        ("weights", "2 values for 3 adapters"),
        ("bad_weight", "comma-separated numbers"),
        ("exists", "exists"),
        ("bad_rank", "--rank must be"),
    ],
)
def test_bad_input_one_line_nonzero_nothing_written(tmp_path, adapters, capsys, case, expect):
    a, b, c = adapters
    out = tmp_path / "out"
    argv = {
        "missing": ["combine", a, tmp_path / "nope", "--out", out],
        "not_adapter": ["combine", a, _plain_folder(tmp_path / "plain"), "--out", out],  # out is not inside it
        "corrupt": ["combine", a, _corrupt_copy(b, tmp_path / "bad"), "--out", out],
        "shapes": ["combine", a, _other_model(tmp_path), "--out", out],
        "weights": ["combine", a, b, c, "--weights", "1,2", "--out", out],
        "bad_weight": ["combine", a, b, "--weights", "1,x", "--out", out],
        "exists": ["combine", a, b, "--out", a],
        "bad_rank": ["combine", a, b, "--rank", "smallest", "--out", out],
    }[case]
    before = load_adapter(a).sha256
    code, _, err = run(argv, capsys)
    assert code != 0
    assert expect in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert load_adapter(a).sha256 == before


def test_force_replaces_output(tmp_path, adapters, capsys):
    a, b, _ = adapters
    out = tmp_path / "o"
    assert run(["combine", a, "--out", out], capsys)[0] == 0
    assert run(["combine", a, b, "--out", out], capsys)[0] != 0
    assert run(["combine", a, b, "--out", out, "--force"], capsys)[0] == 0
    assert len(load_adapter(out).delta) == len(load_adapter(a).delta)
    assert [b["weight"] for b in json.loads((out / "lorablocks.json").read_text())["recipe"]["blocks"]] == [1.0, 1.0]


def test_console_script_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lorablocks", "inspect", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("verb", ["combine", "subtract", "similarity", "inspect"])
def test_every_verb_has_help(verb, capsys):
    code, out, _ = run([verb, "--help"], capsys)
    assert code == 0 and "Usage" in out


def test_subtracting_an_adapter_from_itself_is_refused_and_writes_nothing(tmp_path, adapters, capsys):
    a = adapters[0]
    code, _, err = run(["subtract", a, a, "--out", tmp_path / "zero"], capsys)
    assert code == 2 and "exactly zero" in err
    assert list(tmp_path.iterdir()) == []


def test_nan_found_mid_combine_leaves_nothing(tmp_path, adapters, capsys):
    """Factors are read one module at a time; a NaN in a later module must still leave no output."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(adapters[1], bad)
    tensors = load_file(bad / WEIGHTS_NAME)
    last = sorted(k for k in tensors if "lora_B" in k)[-1]
    tensors[last][0, 0] = float("nan")
    save_file(tensors, bad / WEIGHTS_NAME)
    code, _, err = run(["combine", adapters[0], bad, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "NaN or inf" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_merge_into_a_folder_that_is_not_a_model(tmp_path, adapters, capsys):
    plain = _plain_folder(tmp_path / "plain")
    code, _, err = run(["combine", adapters[0], "--merge-into", plain, "--out", tmp_path / "m"], capsys)
    assert code == 2 and "not a model folder" in err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("argv", [["combine", "--bogus"], ["nosuchverb"], ["combine"], ["similarity", "--json"]])
def test_usage_errors_are_reported_without_traceback(argv, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2
    assert "Traceback" not in out + err and ("Usage" in out + err or "Error" in out + err)


def test_similarity_json_and_plot_to_one_path_is_refused_before_writing(tmp_path, adapters, capsys):
    out = tmp_path / "same"
    code, _, err = run(["similarity", *adapters, "--json", out, "--plot", out], capsys)
    assert code == 2 and "different files" in err and "Traceback" not in err
    assert not out.exists()


def test_inspect_sorts_modules_naturally(tmp_path, capsys):
    from lorablocks.compose.operations import natural_key

    names = ["model.layers.10.q", "model.layers.2.q", "model.layers.1.q"]
    assert sorted(names, key=natural_key) == ["model.layers.1.q", "model.layers.2.q", "model.layers.10.q"]
