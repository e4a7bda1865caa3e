"""``similarity --probe-data``: the function overlap matrix through the CLI, on a tiny model."""

from __future__ import annotations

import json

from lorablocks.cli import run_app
from tests.tiny_models import make_peft_adapter


def test_probe_prints_and_writes_the_function_overlap(tmp_path, tiny_model_dirs, domains, capsys):
    a = make_peft_adapter("llama", tmp_path / "a", seed=1)
    b = make_peft_adapter("llama", tmp_path / "b", seed=2)
    out = tmp_path / "sim.json"
    code = run_app(["similarity", str(a), str(b), "--probe-data", str(domains["math"]), "--probe-data",
                    str(domains["words"]), "--model", str(tiny_model_dirs["llama"]), "--probe-limit", "4",
                    "--json", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "function overlap" in err
    fo = json.loads(out.read_text())["function_overlap"]
    assert fo["probe_domains"] == ["math", "words"]
    I = fo["interference"]
    assert I[0][0] == 1.0 and I[1][1] == 1.0 and I[0][1] > 0 and I[1][0] > 0 and I[0][1] != 1.0
    assert -1 <= fo["functional_cosine"][0][1] <= 1


def test_probe_needs_a_model_and_one_domain_per_adapter(tmp_path, tiny_model_dirs, domains, capsys):
    a = make_peft_adapter("llama", tmp_path / "a", seed=1)
    b = make_peft_adapter("llama", tmp_path / "b", seed=2)
    assert run_app(["similarity", str(a), str(b), "--probe-data", str(domains["math"])]) == 2
    assert "--model" in capsys.readouterr().err
    code = run_app(["similarity", str(a), str(b), "--probe-data", str(domains["math"]), "--model",
                    str(tiny_model_dirs["llama"])])
    err = capsys.readouterr().err
    assert code == 2 and "1 probe domains for 2 adapters" in err and "Traceback" not in err
