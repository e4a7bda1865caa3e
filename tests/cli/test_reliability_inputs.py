"""Reliability at the command line, round two (issue 14): no output is, holds or lies inside an input (files
inside input folders too), a checkpoint folder lorablocks did not make is never touched, pickled model weights
are never loaded, YAML configs cannot explode, unknown tensor dtypes and tied ``lm_head`` LoRA are refused in
one line, and messages blame the setting at fault. Each test failed on the code before issue 14."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.utils import logging as transformers_logging

from lorablocks.files.adapters import WEIGHTS_NAME, load_adapter
from tests.cli.test_reliability import one_error_line, run, snapshot, temporaries
from tests.tiny_models import make_peft_adapter

torch.set_num_threads(1)
transformers_logging.disable_progress_bar()  # loading bars of models loaded in this process (the CLI hides them)


@pytest.fixture(scope="module")
def blocks(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("blocks")
    return [make_peft_adapter("llama", root / f"d{i}", seed=40 + i, r=2) for i in range(2)]


# --- no output replaces an input, or a file inside an input folder ---------------------------------------


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_similarity_never_replaces_a_file_inside_an_input_adapter(tmp_path, blocks, capsys, flag):
    blocks = [Path(shutil.copytree(b, tmp_path / b.name)) for b in blocks]  # the old code replaced them
    before = snapshot(blocks[0])
    code, err = run(["similarity", *blocks, flag, blocks[0] / WEIGHTS_NAME, "--force"], capsys)
    assert code == 2 and "input" in one_error_line(err)
    assert snapshot(blocks[0]) == before
    code, err = run(["similarity", *blocks, flag, blocks[1] / "notes.json"], capsys)  # a new file inside one
    assert code == 2 and "inside the input" in one_error_line(err)
    assert not (blocks[1] / "notes.json").exists() and temporaries(blocks[1]) == []


def test_eval_never_replaces_its_data_file(tmp_path, tiny_model_dirs, domains, capsys):
    data = tmp_path / "d"
    data.mkdir()
    x = data / "x.jsonl"
    x.write_bytes((domains["math"] / "test.jsonl").read_bytes())
    before = x.read_bytes()
    base = ["eval", "--model", tiny_model_dirs["llama"], "--data", x, "--limit", "1", "--max-length", "64",
            "--batch-tokens", "64"]
    code, err = run([*base, "--json", x, "--force"], capsys)
    assert code == 2 and f"is the input {x}" in one_error_line(err)
    assert x.read_bytes() == before and sorted(p.name for p in data.iterdir()) == ["x.jsonl"]
    model_file = tiny_model_dirs["llama"] / "scores.json"  # inside the input model folder
    code, err = run([*base, "--json", model_file], capsys)
    assert code == 2 and "inside the input" in one_error_line(err) and not model_file.exists()
    code, err = run([*base, "--json", tmp_path / "scores.json"], capsys)  # elsewhere: written
    assert code == 0 and json.loads((tmp_path / "scores.json").read_text())


def test_combine_output_inside_an_input_adapter_is_refused_before_work(tmp_path, blocks, capsys):
    before = snapshot(blocks[0])
    code, err = run(["combine", *blocks, "--out", blocks[0] / "sum"], capsys)
    assert code == 2 and "inside the input" in one_error_line(err)
    assert snapshot(blocks[0]) == before


# --- checkpoint folders ----------------------------------------------------------------------------------


def _train(tiny_model_dirs, domains, out: Path, *extra) -> list:
    return ["train", "--model", tiny_model_dirs["llama"], "--data", domains["math"], "--out", out, "--max-steps", "1",
            "--batch-size", "2", "--val-limit", "2", "--eval-every", "0", "--precision", "fp32", "--quiet", *extra]


def test_train_never_deletes_a_checkpoint_folder_it_did_not_make(tmp_path, tiny_model_dirs, domains, capsys):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    code, err = run(_train(tiny_model_dirs, domains, tmp_path / "o", "--checkpoint-dir", victim), capsys)
    assert code == 2 and "--checkpoint-dir" in one_error_line(err) and "holds thesis.tex" in err
    (victim / "step-0000001").mkdir()  # looks like a checkpoint, but is none and the folder has no marker
    (victim / "thesis.tex").unlink()
    (victim / "step-0000001" / "draft.tex").write_text("more work")
    code, err = run(_train(tiny_model_dirs, domains, tmp_path / "o", "--checkpoint-dir", victim), capsys)
    assert code == 2 and "was not made by lorablocks" in one_error_line(err)
    assert (victim / "step-0000001" / "draft.tex").read_text() == "more work" and not (tmp_path / "o").exists()


def test_train_removes_only_the_checkpoints_it_wrote(tmp_path, tiny_model_dirs, domains, capsys):
    empty = tmp_path / "mine"  # made by the user, empty: used, and left in place
    empty.mkdir()
    code, err = run(_train(tiny_model_dirs, domains, tmp_path / "o", "--checkpoint-dir", empty, "--max-steps", "3",
                           "--checkpoint-every", "1"), capsys)
    assert code == 0, err
    assert empty.is_dir() and list(empty.iterdir()) == []
    made = tmp_path / "made"  # made by lorablocks: removed at the end
    code, err = run(_train(tiny_model_dirs, domains, tmp_path / "o2", "--checkpoint-dir", made, "--max-steps", "3",
                           "--checkpoint-every", "1"), capsys)
    assert code == 0, err
    assert not made.exists()


def test_checkpoint_folder_inside_the_model_is_refused(tmp_path, tiny_model_dirs, domains, capsys):
    inside = tiny_model_dirs["llama"] / "ck"
    code, err = run(_train(tiny_model_dirs, domains, tmp_path / "o", "--checkpoint-dir", inside), capsys)
    assert code == 2 and "inside the input" in one_error_line(err) and not inside.exists()


# --- pickled model weights are never loaded --------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.path = marker

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _pickled_model(tiny_model_dirs, folder: Path, marker: Path) -> Path:
    folder.mkdir()
    for f in tiny_model_dirs["llama"].iterdir():
        if not f.name.endswith(".safetensors"):
            (folder / f.name).write_bytes(f.read_bytes())
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Payload(marker)}))
    return folder


def test_pickled_model_weights_are_refused_everywhere(tmp_path, tiny_model_dirs, domains, blocks, capsys):
    marker = tmp_path / "pwned"
    model = _pickled_model(tiny_model_dirs, tmp_path / "pickled", marker)
    for argv in (["eval", "--model", model, "--data", domains["math"], "--limit", "1"],
                 ["combine", *blocks, "--merge-into", model, "--out", tmp_path / "m"],
                 ["train", "--model", model, "--data", domains["math"], "--out", tmp_path / "t", "--max-steps", "1"]):
        code, err = run(argv, capsys)
        assert code == 2 and "pickled pytorch_model.bin" in one_error_line(err), (argv, err)
    assert not marker.exists() and not (tmp_path / "m").exists() and not (tmp_path / "t").exists()


# --- YAML configs ----------------------------------------------------------------------------------------


def _alias_bomb(levels: int) -> str:
    lines, prev = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"], "a0"
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join(['*' + prev] * 9)}]")
        prev = f"a{i}"
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("verb", ["study", "train"])
def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path, verb, capsys):
    config = tmp_path / "bomb.yaml"
    config.write_text(_alias_bomb(3))  # 9^4 entries expanded: small enough for the old code to build
    argv = ["study", config, "--out", tmp_path / "s"] if verb == "study" else ["train", "--config", config]
    code, err = run(argv, capsys)
    assert code == 2 and "aliases" in one_error_line(err) and str(config) in err


@pytest.mark.parametrize("verb", ["study", "train"])
def test_config_that_is_not_utf8_names_the_file(tmp_path, verb, capsys):
    config = tmp_path / "utf16.yaml"
    config.write_bytes(b"\xff\xfe" + "model: x\n".encode("utf-16-le"))
    argv = ["study", config, "--out", tmp_path / "s"] if verb == "study" else ["train", "--config", config]
    code, err = run(argv, capsys)
    assert code == 2 and "not UTF-8" in one_error_line(err) and str(config) in err


# --- tensor dtypes ---------------------------------------------------------------------------------------


def _recast(src: Path, dest: Path, dtype: torch.dtype) -> Path:
    dest.mkdir()
    for f in src.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / WEIGHTS_NAME))
    save_file({k: v.to(dtype) for k, v in tensors.items()}, str(dest / WEIGHTS_NAME))
    return dest


def test_float8_factors_are_upcast_exactly(tmp_path, blocks, capsys):
    f8 = _recast(blocks[0], tmp_path / "f8", torch.float8_e4m3fn)
    code, err = run(["inspect", f8], capsys)
    assert code == 0, err
    code, err = run(["combine", f8, blocks[1], "--out", tmp_path / "sum", "--rank", "concat"], capsys)
    assert code == 0, err
    stored = load_file(str(f8 / WEIGHTS_NAME))
    exact = {k: v.float() for k, v in stored.items()}  # float8 -> float32 is exact
    got = load_adapter(f8).delta
    ref = load_adapter(_recast_values(f8, tmp_path / "f32", exact)).delta
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[m].A, ref[m].A) and torch.equal(got[m].B, ref[m].B) for m in got)
    assert any(float(ref[m].B.abs().sum()) > 0 for m in ref)


def _recast_values(src: Path, dest: Path, tensors: dict) -> Path:
    dest.mkdir()
    for f in src.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    save_file(tensors, str(dest / WEIGHTS_NAME))
    return dest


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
def test_other_dtypes_are_refused_in_one_line(tmp_path, blocks, capsys, dtype):
    bad = _recast(blocks[0], tmp_path / "bad", dtype)
    for argv in (["inspect", bad], ["combine", bad, blocks[1], "--out", tmp_path / "sum"]):
        code, err = run(argv, capsys)
        assert code == 2 and "is stored as" in one_error_line(err), err
    assert not (tmp_path / "sum").exists()


# --- a LoRA on a tied lm_head ----------------------------------------------------------------------------


def _head_adapter(model, out: Path) -> Path:
    """A PEFT LoRA on ``q_proj`` and the (tied) ``lm_head``, random non-zero factors, LoRA tensors only."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"]))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.save_pretrained(out, save_embedding_layers=False)
    assert any("lm_head.lora_B" in k for k in load_file(str(out / WEIGHTS_NAME)))
    return out


def test_lora_on_a_tied_lm_head_is_refused(tmp_path, tiny_model_dirs, domains, capsys):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    assert base.lm_head.weight is base.get_input_embeddings().weight  # the tiny Llama ties them
    head = _head_adapter(base, tmp_path / "head")
    for argv in (["combine", head, "--merge-into", tiny_model_dirs["llama"], "--out", tmp_path / "m"],
                 ["eval", "--model", tiny_model_dirs["llama"], "--adapter", head, "--data", domains["math"],
                  "--limit", "1"]):
        code, err = run(argv, capsys)
        assert code == 2 and "lm_head" in one_error_line(err) and "input embedding" in err, err
    assert not (tmp_path / "m").exists()


# --- messages name the setting at fault ------------------------------------------------------------------


@pytest.mark.parametrize("method,flag", [("ties", "--density"), ("dare_linear", "--density"), ("tsv", "--fraction")])
def test_nan_method_parameter_is_called_not_finite(tmp_path, blocks, capsys, method, flag):
    code, err = run(["combine", *blocks, "--method", method, flag, "nan", "--out", tmp_path / "o"], capsys)
    line = one_error_line(err)
    assert code == 2 and flag in line and "finite" in line and "less than" not in line


def test_eval_batch_tokens_names_its_flag(tiny_model_dirs, domains, capsys):
    code, err = run(["eval", "--model", tiny_model_dirs["llama"], "--data", domains["math"], "--limit", "1",
                     "--batch-tokens", "0"], capsys)
    assert code == 2 and one_error_line(err).startswith("error: --batch-tokens:")


def test_generate_with_a_tiny_temperature_is_greedy(tiny_model_dirs, capsys):
    argv = ["generate", "x", "--model", tiny_model_dirs["llama"], "--max-new-tokens", "4", "--raw"]
    greedy = _run_out([*argv, "--temperature", "0"], capsys)
    tiny = _run_out([*argv, "--temperature", "1e-300", "--seed", "1"], capsys)
    assert greedy[0] == 0 and tiny[0] == 0, tiny
    assert tiny[1] == greedy[1]  # the limit of sampling as the temperature goes to 0


def _run_out(argv, capsys) -> tuple[int, str]:
    from lorablocks.cli import run_app

    code = run_app([str(a) for a in argv])
    return code, capsys.readouterr().out
