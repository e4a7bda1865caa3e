"""The study's config reuses the training declarations: its ``lora`` section is LoraSettings, its ``train``
section OptimSettings plus ``steps_per_domain``; each block's TrainConfig is built from them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from lorablocks.errors import ConfigError
from lorablocks.study.config import PRESETS, StudyConfig, TrainSettings, load_config
from lorablocks.training.config import LoraSettings, OptimSettings, TrainConfig


def test_sections_are_the_training_declarations():
    assert StudyConfig.model_fields["lora"].annotation is LoraSettings
    train = TrainSettings.model_fields
    assert set(train) == set(OptimSettings.model_fields) | {"steps_per_domain", "merged_updates"}
    for name, info in OptimSettings.model_fields.items():  # same default, bounds and help
        assert (train[name].default, train[name].metadata, train[name].description) == (
            info.default, info.metadata, info.description), name
    assert train["steps_per_domain"].default == TrainConfig.model_fields["max_steps"].default


def test_existing_keys_presets_and_one_default_each():
    cfg = load_config(preset="quick")
    assert (cfg.train.steps_per_domain, cfg.train.batch_size, cfg.train.max_length, cfg.train.val_limit) == (8, 8, 128, 8)
    assert load_config(preset="smoke").train.train_limit == 64
    for preset in PRESETS:
        load_config(preset=preset)
    # defaults are the training defaults: one declaration, one value
    assert StudyConfig().train.val_limit == TrainConfig().val_limit == 100
    assert StudyConfig().train.learning_rate == TrainConfig().learning_rate


def test_errors_name_the_setting_with_its_section(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"domains": ["math", "math"], "lora": {"r": 0},
                                   "train": {"max_length": 8, "weight_decay": -1, "max_steps": 3}}))
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    msg = str(exc.value)
    assert msg.startswith("5 problem(s) in the study config: ")
    for part in ("domains must be distinct", "lora.r must be >= 1, got 0", "train.max_length must be >= 16, got 8",
                 "train.weight_decay must be >= 0", "unknown setting 'train.max_steps'"):
        assert part in msg, part


def test_train_block_builds_the_training_config(tmp_path, monkeypatch):
    import lorablocks.training.train as train_mod

    seen: list[TrainConfig] = []
    monkeypatch.setattr(train_mod, "train_adapter", lambda tc, **kw: seen.append(tc))
    cfg = load_config(overrides={"lora": {"r": 8, "targets": ["q_proj"]},
                                 "train": {"steps_per_domain": 6, "warmup_steps": 10, "weight_decay": 0.1}})
    from lorablocks.study.stages import StudyContext, _train_block

    ctx = StudyContext(config=cfg, out=tmp_path, domains={"math": SimpleNamespace(source="/d/math"),
                                                         "words": SimpleNamespace(source="/d/words")},
                       data_prints={}, model_id="m", log=print, _session=SimpleNamespace(model=None, tokenizer=None))
    _train_block(ctx, ("math", "words"), 3, tmp_path / "block")
    (tc,) = seen
    assert tc.r == 8 and tc.targets == ["q_proj"] and tc.weight_decay == 0.1 and tc.seed == 3
    assert tc.max_steps == 12 and tc.warmup_steps == 6  # warm-up capped at half the block's steps
    assert tc.eval_every == 0 and tc.data == ["/d/math", "/d/words"] and tc.force and not tc.resume
    assert Path(tc.checkpoint_dir) == tmp_path / ".ckpt-block"
    for name in OptimSettings.model_fields:
        if name != "warmup_steps":
            assert getattr(tc, name) == getattr(cfg.train, name), name


def test_precision_is_one_setting_for_training_and_its_own_for_evaluation():
    """``train.precision`` is the training declaration (so each block trains in it); ``eval.precision`` has
    the same values and default."""
    cfg = load_config(preset="quick", overrides={"train": {"precision": "bf16"}, "eval": {"precision": "fp32"}})
    assert (cfg.train.precision, cfg.eval.precision) == ("bf16", "fp32")
    assert StudyConfig().train.precision == StudyConfig().eval.precision == TrainConfig().precision == "auto"
    with pytest.raises(ConfigError) as exc:
        load_config(overrides={"train": {"precision": "fp16"}, "eval": {"precision": "half"}})
    assert "train.precision must be 'auto', 'fp32' or 'bf16', got 'fp16'" in str(exc.value)
    assert "eval.precision must be 'auto', 'fp32' or 'bf16', got 'half'" in str(exc.value)


def test_validation_split_is_refused_while_something_fits_on_validation():
    # the probe fits on validation examples by default: scoring there would score what was fitted
    with pytest.raises(ConfigError, match="eval.split: validation is refused while the function-overlap probe"):
        load_config(overrides={"eval": {"split": "validation"}})
    with pytest.raises(ConfigError, match="method learned"):
        load_config(overrides={"eval": {"split": "validation"}, "analysis": {"probe_limit": 0},
                               "methods": [{"name": "learned"}]})
    # nothing fitted on validation: allowed
    cfg = load_config(overrides={"eval": {"split": "validation"}, "analysis": {"probe_limit": 0},
                                 "methods": [{"name": "ties", "params": {"density": 0.5}}]})
    assert cfg.eval.split == "validation"


def _ctx(tmp_path, merged_updates: str):
    from lorablocks.study.stages import StudyContext

    cfg = load_config(preset="quick", overrides={"train": {"merged_updates": merged_updates}})
    prints = {d: {"train": f"t-{d}", "validation": f"v-{d}"} for d in cfg.domains}
    doms = {d: SimpleNamespace(source=f"/data/{d}") for d in cfg.domains}
    ctx = StudyContext(cfg, tmp_path, doms, prints, "smollm2-135m", log=lambda *_: None)
    ctx._session = SimpleNamespace(model=None, tokenizer=None)
    return ctx


def test_merged_updates_same_gives_a_merged_adapter_the_steps_of_a_single_block_at_k_times_the_batch(tmp_path,
                                                                                                     monkeypatch):
    import lorablocks.training.train as train_mod
    from lorablocks.study.stages import _block_path, _train_block

    seen = {}
    monkeypatch.setattr(train_mod, "train_adapter", lambda tc, **kw: seen.setdefault(len(tc.data), tc))
    paper, same = _ctx(tmp_path, "per_domain"), _ctx(tmp_path, "same")
    pair = ("math", "medicine")
    for ctx, want in ((paper, (16, 8)), (same, (8, 16))):
        seen.clear()
        _train_block(ctx, pair, 0, tmp_path / "m")
        _train_block(ctx, ("math",), 0, tmp_path / "s")
        assert (seen[2].max_steps, seen[2].batch_size) == want
        assert (seen[1].max_steps, seen[1].batch_size) == (8, 8)  # a single block is trained the same either way
        assert seen[2].warmup_steps <= seen[2].max_steps // 2
    # single blocks keep their cache under either setting (and the paper's merged key is the one of earlier runs);
    # merged-data adapters trained another way get another folder
    assert _block_path(paper, 0, ("math",)) == _block_path(same, 0, ("math",))
    assert _block_path(paper, 0, pair) != _block_path(same, 0, pair)
    from lorablocks.study.stages import fingerprint

    old = {"model": "smollm2-135m", "subset": list(pair), "data": {d: f"t-{d}" for d in pair},
           "val": {d: f"v-{d}" for d in pair}, "lora": paper.config.lora.model_dump(),
           "train": paper.config.train.model_dump(exclude={"merged_updates"}), "seed": 0, "format": 1}
    assert _block_path(paper, 0, pair).name.endswith(fingerprint(old)[:12])  # the key before the setting existed
