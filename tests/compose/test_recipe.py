"""The composition seam: recipes are validated up front, fingerprinted by content, and compose() is exact."""

from __future__ import annotations

import json

import pytest
import torch

from lorablocks.compose import Block, compose, make_recipe
from lorablocks.compose.methods import method_names
from lorablocks.compose.operations import CombineRequest, combine_files, open_blocks
from lorablocks.core import algebra
from lorablocks.errors import BaseModelMismatchError, CompositionError
from tests.core.test_algebra import random_delta
from tests.tiny_models import make_peft_adapter


def _dense(delta, name):
    return algebra.to_dense(delta[name], torch.float64)


def test_sum_recipe_equals_the_dense_weighted_sum():
    d1, d2 = random_delta(seed=1), random_delta(seed=2)
    recipe = make_recipe([Block(name="a", weight=0.7), Block(name="b", weight=-1.3)], rank="minimal")
    out = compose(recipe, [d1, d2])
    for m in set(d1) | set(d2):
        want = sum(w * _dense(d, m) for w, d in ((0.7, d1), (-1.3, d2)) if m in d)
        assert torch.allclose(_dense(out.delta, m), want, atol=1e-5)
        assert want.abs().max() > 1e-2  # not vacuous
    assert out.report.overall_rel_error < 1e-6


def test_fingerprint_depends_on_content_not_names():
    a = make_recipe([Block(name="x", sha256="1" * 64), Block(name="y", sha256="2" * 64, weight=2.0)])
    same = make_recipe([Block(name="p", sha256="1" * 64, path="/a"), Block(name="q", sha256="2" * 64, weight=2.0)])
    other = make_recipe([Block(name="x", sha256="1" * 64), Block(name="y", sha256="2" * 64, weight=-2.0)])
    assert a.fingerprint() == same.fingerprint() != other.fingerprint()
    assert make_recipe([Block(name="x", sha256="1" * 64)], rank=3).fingerprint() != make_recipe(
        [Block(name="x", sha256="1" * 64)]).fingerprint()


@pytest.mark.parametrize("kwargs, words", [
    ({"method": "nope"}, "unknown method"),
    ({"rank": "lots"}, "rank must be"),
    ({"rank": 0}, "rank must be"),
    ({"rtol": float("nan")}, "rtol"),
    ({"rtol": -1.0}, "rtol"),
    ({"params": {"density": 0.5}}, "takes no parameter density"),
])
def test_bad_recipes_are_one_typed_error(kwargs, words):
    with pytest.raises(CompositionError, match=words) as info:
        make_recipe([Block(name="a")], **kwargs)
    assert "\n" not in str(info.value)


def test_weights_must_be_finite_and_not_overflow():
    with pytest.raises(CompositionError, match="finite") as info:
        make_recipe([Block(name="a", weight=float("inf"))])
    assert info.value.setting == "weights"
    recipe = make_recipe([Block(name="a", weight=1e39), Block(name="b")])
    with pytest.raises(CompositionError, match="overflows"):
        compose(recipe, [random_delta(seed=1), random_delta(seed=2)])


def test_sum_is_listed_first():
    assert method_names()[0] == "sum"


def test_record_round_trips_as_the_recipe(tmp_path):
    a = make_peft_adapter("llama", tmp_path / "a", seed=1)
    b = make_peft_adapter("llama", tmp_path / "b", seed=2, r=2)
    result = combine_files([a, b], tmp_path / "out", CombineRequest(weights=[1.0, -0.5], rank=3))
    record = json.loads((tmp_path / "out" / "lorablocks.json").read_text())
    again = make_recipe([Block(**b) for b in record["recipe"]["blocks"]], rank=record["recipe"]["rank"],
                        rtol=record["recipe"]["rtol"], method=record["recipe"]["method"])
    assert again.fingerprint() == record["recipe"]["fingerprint"] == result.recipe.fingerprint()
    assert record["kind"] == "adapter" and 0 < record["truncation"]["overall_rel_error"] < 1


def _with_base(path, base):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def test_different_recorded_base_models_are_refused_unless_allowed(tmp_path):
    a = _with_base(make_peft_adapter("llama", tmp_path / "a", seed=1), "gpt2")
    b = _with_base(make_peft_adapter("llama", tmp_path / "b", seed=2), "smollm2-135m")
    with pytest.raises(BaseModelMismatchError, match="gpt2") as info:
        open_blocks([a, b])
    assert "smollm2-135m" in str(info.value)
    assert not (tmp_path / "out").exists()
    combine_files([a, b], tmp_path / "out", CombineRequest(allow_base_mismatch=True))
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    # the built-in name and its hub alias are the same model
    c = _with_base(make_peft_adapter("llama", tmp_path / "c", seed=3), "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert len(open_blocks([b, c])) == 2


def test_disjoint_modules_of_different_base_models_are_refused(tmp_path):
    a = _with_base(make_peft_adapter("llama", tmp_path / "q", seed=1, target_modules=["q_proj"]), "some/llama")
    b = _with_base(make_peft_adapter("llama", tmp_path / "d", seed=2, target_modules=["down_proj"]), "smollm2-135m")
    with pytest.raises(BaseModelMismatchError):  # no module in common, so no shape can disagree
        open_blocks([a, b])
    g = _with_base(make_peft_adapter("gpt2", tmp_path / "g", seed=3), "gpt2")
    with pytest.raises(BaseModelMismatchError):
        open_blocks([g, b])
