"""``serve --method regmean``: every live change composes the active blocks by RegMean from their stored
statistics; a block without statistics (or a negative weight) is refused and changes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from lorablocks.cli import run_app
from lorablocks.compose.operations import blocks_of, open_blocks
from lorablocks.compose.recipe import compose
from lorablocks.model.merge import merged, target_weight
from lorablocks.serving.blocks import live_recipe
from tests.serving.conftest import start_server
from tests.tiny_models import make_peft_adapter

MODULE = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def stats_blocks(model_dir: Path, domains: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A blocks folder: ``math`` and ``words`` with statistics on their own domain, ``bare`` without."""
    root = tmp_path_factory.mktemp("statblocks")
    for i, d in enumerate(("math", "words", "bare")):
        a = make_peft_adapter("llama", root / d, seed=20 + i, std=0.2,
                              model=AutoModelForCausalLM.from_pretrained(str(model_dir)))
        if d != "bare":
            assert run_app(["stats", str(a), "--model", str(model_dir), "--data", str(domains[d]),
                            "--limit", "16"]) == 0
    return root


@pytest.fixture(scope="module")
def regmean_live(model_dir: Path, stats_blocks: Path) -> Any:
    from lorablocks.model.session import ComposedModel
    from lorablocks.serving.blocks import BlockLibrary
    from lorablocks.serving.live import LiveModel

    return LiveModel(ComposedModel.load(str(model_dir)), BlockLibrary(stats_blocks), "regmean", {"alpha": 0.9})


@pytest.fixture(scope="module")
def regmean_server(regmean_live: Any) -> Any:
    server, _ = start_server(regmean_live, max_tokens_limit=16)
    yield server
    server.stop()


def _served(live: Any) -> torch.Tensor:
    return target_weight(live.composed.model, MODULE)[0].detach().clone()


def _expected(model_dir: Path, root: Path, entries: list[tuple[str, float]], method: str) -> torch.Tensor:
    """The weight after merging ``compose(recipe)`` of ``entries`` by ``method`` into a fresh model."""
    files = open_blocks([root / n for n, _ in entries])
    recipe = live_recipe(blocks_of(files, [w for _, w in entries]), method, {"alpha": 0.9} if method == "regmean" else {})
    delta = compose(recipe, files).delta
    fresh = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    with merged(fresh, delta):
        return target_weight(fresh, MODULE)[0].detach().clone()


def test_regmean_server_serves_the_regmean_composition_and_recomputes_on_removal(regmean_server, regmean_live,
                                                                                 model_dir, stats_blocks):
    base = _served(regmean_live)
    with httpx.Client(base_url=regmean_server.url, timeout=60) as c:
        r = c.put("/v1/blocks", json={"active": [{"name": "math", "weight": 1.0}, {"name": "words", "weight": 0.5}]})
        assert r.status_code == 200, r.text
        state = c.get("/v1/blocks").json()
        assert state["method"] == "regmean" and state["params"] == {"alpha": 0.9}
        both = _served(regmean_live)
        want = _expected(model_dir, stats_blocks, [("math", 1.0), ("words", 0.5)], "regmean")
        summed = _expected(model_dir, stats_blocks, [("math", 1.0), ("words", 0.5)], "sum")
        torch.testing.assert_close(both, want, rtol=1e-5, atol=1e-6)
        assert (both - summed).abs().max() > 1e-3 and (both - base).abs().max() > 1e-3

        r = c.delete("/v1/blocks/words")
        assert r.status_code == 200, r.text
        alone = _served(regmean_live)
        torch.testing.assert_close(alone, _expected(model_dir, stats_blocks, [("math", 1.0)], "regmean"),
                                   rtol=1e-5, atol=1e-6)
        assert (alone - both).abs().max() > 1e-3
        assert r.json()["fingerprint"] != state["fingerprint"]


@pytest.mark.parametrize("change", ["post", "put"])
def test_a_block_without_statistics_is_refused_and_nothing_changes(regmean_server, regmean_live, change):
    regmean_live.set_active([("math", 1.0)])
    before, fp = _served(regmean_live), regmean_live.fingerprint
    with httpx.Client(base_url=regmean_server.url, timeout=60) as c:
        if change == "post":
            r = c.post("/v1/blocks/bare", json={"weight": 1.0})
        else:
            r = c.put("/v1/blocks", json={"active": [{"name": "math"}, {"name": "bare"}]})
        assert r.status_code == 422
        assert "'bare' has no input statistics" in r.json()["error"]["message"]
        assert len(r.text.splitlines()) == 1
        state = c.get("/v1/blocks").json()
    assert state["fingerprint"] == fp and state["active"] == [{"name": "math", "weight": 1.0}]
    assert torch.equal(_served(regmean_live), before)


def test_a_negative_weight_is_refused_with_the_library_message(regmean_server, regmean_live):
    regmean_live.set_active([("math", 1.0)])
    before, fp = _served(regmean_live), regmean_live.fingerprint
    with httpx.Client(base_url=regmean_server.url, timeout=60) as c:
        r = c.post("/v1/blocks/words", json={"weight": -1.0})
    assert r.status_code == 422 and "regmean takes no negative weights" in r.json()["error"]["message"]
    assert regmean_live.fingerprint == fp and torch.equal(_served(regmean_live), before)


def test_the_default_method_is_sum(live):
    live.set_active([("math", 1.0)])
    assert live.state()["method"] == "sum" and live.state()["params"] == {}
    assert live.method == "sum"
    live.set_active([])


def test_serve_refuses_a_starting_block_without_statistics_or_a_bad_method(model_dir, stats_blocks, capsys):
    cases = [
        (["--method", "regmean", "--active", "math,bare"], "block 'bare' has no input statistics"),
        (["--method", "nosuch"], "unknown method 'nosuch'"),
        (["--method", "regmean", "--alpha", "2"], "alpha"),
    ]
    for args, message in cases:
        assert run_app(["serve", "--model", str(model_dir), "--blocks", str(stats_blocks), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert len([line for line in err.splitlines() if line.strip()]) == 1


def test_new_stored_statistics_are_used_at_the_next_change(model_dir, stats_blocks, domains, tmp_path):
    import shutil

    from lorablocks.files.statistics import STATS_NAME
    from lorablocks.model.session import ComposedModel
    from lorablocks.serving.blocks import BlockLibrary
    from lorablocks.serving.live import LiveModel

    root = tmp_path / "blocks"
    shutil.copytree(stats_blocks, root)
    live = LiveModel(ComposedModel.load(str(model_dir)), BlockLibrary(root), "regmean")
    entries = [("math", 1.0), ("words", 1.0)]
    live.set_active(entries)
    first = _served(live)
    before = (root / "math" / STATS_NAME).read_bytes()
    assert run_app(["stats", str(root / "math"), "--model", str(model_dir), "--data", str(domains["words"]),
                    "--limit", "16", "--force"]) == 0  # new statistics for math (other inputs), same weights
    assert (root / "math" / STATS_NAME).read_bytes() != before
    live.set_active(entries)
    torch.testing.assert_close(_served(live), _expected(model_dir, root, entries, "regmean"), rtol=1e-5, atol=1e-6)
    assert (_served(live) - first).abs().max() > 1e-4
    from lorablocks.files.statistics import open_statistics  # the block was read again, statistics and all

    assert live.library.get("math").file.statistics.sha256 == open_statistics(root / "math" / STATS_NAME).sha256


def test_statistics_leading_outside_the_blocks_folder_are_never_read(model_dir, stats_blocks, tmp_path):
    import os
    import shutil

    from lorablocks.files.statistics import STATS_NAME
    from lorablocks.serving.blocks import BlockLibrary
    from lorablocks.serving.errors import BlockNameError

    root, outside = tmp_path / "blocks", tmp_path / "outside"
    shutil.copytree(stats_blocks / "bare", root / "sneaky")
    shutil.copytree(stats_blocks / "math", outside / "math")
    os.symlink(outside / "math" / STATS_NAME, root / "sneaky" / STATS_NAME)
    library = BlockLibrary(root)
    assert library.names() == []
    with pytest.raises(BlockNameError, match="leads outside the blocks folder"):
        library.get("sneaky")
