"""Training config: one declaration per setting (pydantic); problems reported together, named by setting;
the ``train`` flags derived from the fields."""

from __future__ import annotations

import pytest

from lorablocks.cli import app, run_app
from lorablocks.errors import ConfigError
from lorablocks.training.config import LoraSettings, OptimSettings, TrainConfig, load_config


def _problems(values: dict) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(None, values)
    return str(exc.value)


def test_config_reports_every_problem_at_once():
    msg = _problems({"r": 0, "learning_rate": -1.0, "batch_size": "x", "bogus": 1, "precision": "fp8"})
    for part in ("r must be >= 1, got 0", "learning_rate must be > 0, got -1.0", "batch_size must be an integer",
                 "unknown setting 'bogus'", "precision must be 'auto', 'fp32' or 'bf16', got 'fp8'",
                 "data must name at least one domain", "out must name an output folder"):
        assert part in msg, part
    assert msg.startswith("invalid training config: ") and "\n" not in msg
    assert "--" not in msg  # the library names settings, never command-line flags


@pytest.mark.parametrize("values, part", [
    ({"max_length": 15}, "max_length must be >= 16, got 15"),
    ({"alpha": float("nan")}, "alpha must be a finite number"),
    ({"learning_rate": "inf"}, "learning_rate must be a finite number"),
    ({"dropout": 1.0}, "dropout must be < 1, got 1.0"),
    ({"r": True}, "r must be a number, not true/false"),
    ({"r": 2.5}, "r must be an integer, got 2.5"),
    ({"targets": []}, "targets must hold at least 1 item(s)"),
    ({"limit": 0}, "train_limit must be >= 1, got 0"),
    ({"resume": "maybe"}, "resume must be true or false"),
    ({"val_limit": -1}, "val_limit must be >= 0, got -1"),
])
def test_each_bound_is_named_by_its_setting(values, part):
    assert part in _problems({"data": ["a"], "out": "o", **values})


def test_config_file_then_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data: [a, b]\nout: o\nlearning-rate: 0.01\nmax_steps: 7\nlimit: 5\ntargets: q_proj,v_proj\n")
    cfg = load_config(f, {"max_steps": 9, "seed": None})
    assert cfg.data == ["a", "b"] and cfg.learning_rate == 0.01 and cfg.max_steps == 9 and cfg.seed == 0
    assert cfg.train_limit == 5 and cfg.targets == ["q_proj", "v_proj"]
    # YAML reads 1e-3 as a string, and a single domain may be a plain string: both are converted
    (tmp_path / "s.yaml").write_text("data: math\nout: o\nlearning_rate: 1e-3\nresume: yes\n")
    cfg = load_config(tmp_path / "s.yaml")
    assert cfg.data == ["math"] and cfg.learning_rate == 1e-3 and cfg.resume is True
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_sections_are_declared_once_and_combined():
    """TrainConfig is LoraSettings + OptimSettings + the run's own settings: same fields, same bounds."""
    fields = TrainConfig.model_fields
    for section in (LoraSettings, OptimSettings):
        for name, info in section.model_fields.items():
            assert fields[name].default == info.default and fields[name].metadata == info.metadata, name
    assert TrainConfig().val_limit == 100 and TrainConfig().max_length == 256
    cfg = TrainConfig(**LoraSettings(r=8).model_dump(), **OptimSettings(batch_size=2).model_dump(), data=["d"], out="o")
    assert cfg.r == 8 and cfg.batch_size == 2 and cfg.checkpoint_path.name == "o.checkpoints"
    assert all(info.description for info in fields.values())  # every setting has its help text


def test_train_flags_are_derived_from_the_fields(capsys):
    """Every setting is a flag with the field's help and default; the aliases of earlier versions remain."""
    import typer.main

    command = typer.main.get_command(app).commands["train"]
    flags = {p.name: p for p in command.params}
    assert set(TrainConfig.model_fields) | {"ctx", "config", "quiet", "help"} >= set(flags) - {"ctx"}
    assert set(TrainConfig.model_fields) <= set(flags)
    assert {"--r", "--rank"} <= set(flags["r"].opts) and {"--learning-rate", "--lr"} <= set(flags["learning_rate"].opts)
    assert flags["train_limit"].opts == ["--limit"] and flags["data"].multiple
    assert TrainConfig.model_fields["max_length"].description in flags["max_length"].help
    assert "[default: 256]" in flags["max_length"].help
    assert run_app(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--micro-batch-tokens" in out and "--rank" in out


def test_cli_config_errors_are_one_line(tmp_path, capsys):
    assert run_app(["train", "--data", "a", "--out", str(tmp_path / "o"), "--max-length", "8", "--lr", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "max_length must be >= 16, got 8" in err and "learning_rate must be > 0" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
