"""Errors of the server (issue 14, items 9 and 14): every one is a JSON 4xx in one line that blames the right
field, logged as one line; nothing is a traceback; a failed change changes nothing, weights included."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from fastapi.testclient import TestClient

from lorablocks.model.merge import target_weight
from lorablocks.serving.blocks import BlockLibrary
from lorablocks.serving.guard import Access
from lorablocks.serving.live import LiveModel, Runner
from lorablocks.serving.server import AppSettings, create_app
from tests.tiny_models import make_peft_adapter

MODULE = "model.layers.0.self_attn.q_proj"


def client_for(live, limit: int = 8) -> TestClient:
    app = create_app(live, Runner(1, 4), AppSettings(model_name="tiny", access=Access(), max_tokens_limit=limit))
    return TestClient(app, base_url="http://127.0.0.1", client=("127.0.0.1", 40000))  # anything escaping: raised


@pytest.fixture
def base(live):
    live.set_active([])
    yield live
    live.set_active([])


def _raw_json(c: TestClient, path: str, text: str, method: str = "POST"):
    return c.request(method, path, content=text.encode(), headers={"content-type": "application/json"})


def _snapshot(live) -> tuple[str, tuple, torch.Tensor]:
    return live.fingerprint, live.active, target_weight(live.composed.model, MODULE)[0].detach().clone()


def _same(live, snap) -> bool:
    fp, active, w = snap
    return live.fingerprint == fp and live.active == active and torch.equal(
        target_weight(live.composed.model, MODULE)[0], w)


def _one_line_logged(caplog, status: int) -> None:
    ours = [r for r in caplog.records if r.name == "lorablocks.serving"]
    assert len(ours) == 1 and ours[0].getMessage().startswith(f"{status} ") and "\n" not in ours[0].getMessage()
    assert not any(r.exc_info or "Traceback" in r.getMessage() or "Exception in ASGI" in r.getMessage()
                   for r in caplog.records)


# ------------------------------------------------------------------------------------ 9: no more 500s


@pytest.mark.parametrize("path, text, field", [
    ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
    ("/v1/completions", '{"prompt": ["\\udfff"], "max_tokens": 1}', "prompt"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 1}',
     "messages.0.content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
     "messages.0.content"),
])
def test_a_lone_surrogate_is_a_422_naming_the_field(base, caplog, path, text, field):
    caplog.set_level(logging.WARNING)
    r = _raw_json(client_for(base), path, text)
    assert r.status_code == 422 and r.json()["error"]["param"].startswith(field), r.text
    assert "surrogate" in r.json()["error"]["message"]
    _one_line_logged(caplog, 422)


def test_a_surrogate_block_name_is_a_400(base):
    r = _raw_json(client_for(base), "/v1/blocks", '{"active": [{"name": "\\ud800"}]}', "PUT")
    assert r.status_code == 400 and "not valid Unicode" in r.json()["error"]["message"]


def test_a_tiny_temperature_samples_like_greedy(base):
    c = client_for(base)
    greedy = c.post("/v1/completions", json={"prompt": "Question:", "max_tokens": 6, "temperature": 0})
    for t in (1e-300, 5e-324, 1e-40):
        r = c.post("/v1/completions", json={"prompt": "Question:", "max_tokens": 6, "temperature": t, "seed": 3})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


@pytest.fixture
def looped(model_dir, tmp_path):
    """A library with two good blocks, a symlink loop, and a block whose config is a symlink loop."""
    from lorablocks.model.session import ComposedModel

    root = tmp_path / "blocks"
    for i, name in enumerate(("math", "words")):
        make_peft_adapter("llama", root / name, seed=i + 1)
    os.symlink(root / "loop", root / "loop")
    make_peft_adapter("llama", root / "selfish", seed=5)
    (root / "selfish" / "adapter_config.json").unlink()
    os.symlink(root / "selfish" / "adapter_config.json", root / "selfish" / "adapter_config.json")
    return LiveModel(ComposedModel.load(str(model_dir)), BlockLibrary(root))


def test_a_symlink_loop_in_the_blocks_folder_is_left_out(looped, caplog):
    caplog.set_level(logging.WARNING)
    c = client_for(looped)
    r = c.get("/v1/blocks")
    assert r.status_code == 200 and r.json()["available"] == ["math", "words"]
    for name in ("loop", "selfish"):
        r = c.post(f"/v1/blocks/{name}", json={})
        assert r.status_code == 400 and "symlink loop" in r.json()["error"]["message"], r.text
        assert looped.fingerprint == "base"
    r = c.post("/v1/blocks/math", json={})
    assert r.status_code == 200 and r.json()["available"] == ["math", "words"]
    assert [b.name for b in looped.active] == ["math"]


def test_a_change_that_fails_unexpectedly_changes_nothing_and_logs_one_line(live, monkeypatch, caplog):
    live.set_active([("math", 1.0)])
    snap = _snapshot(live)
    calls = []

    def broken(self):  # fails after the new weights are computed, before the swap
        calls.append(1)
        raise RuntimeError("the disk went away")

    monkeypatch.setattr(BlockLibrary, "names", broken)
    caplog.set_level(logging.WARNING)
    c = client_for(live)
    for method, path, body in [("POST", "/v1/blocks/words", {"weight": 2.0}), ("DELETE", "/v1/blocks/math", None),
                               ("PUT", "/v1/blocks", {"active": [{"name": "code", "weight": -1}]})]:
        caplog.clear()
        r = c.request(method, path, json=body)
        assert r.status_code == 500 and r.json()["error"]["message"] == ("internal error: RuntimeError: the disk "
                                                                         "went away")
        assert _same(live, snap)
        _one_line_logged(caplog, 500)
    assert len(calls) == 3
    monkeypatch.undo()
    live.set_active([])


def test_a_refused_change_leaves_the_merged_weights_as_they_were(live):
    live.set_active([("math", 1.0), ("words", 0.5)])
    snap = _snapshot(live)
    c = client_for(live)
    for method, path, body in [("PUT", "/v1/blocks", {"active": [{"name": "code"}, {"name": "corrupt"}]}),
                               ("PUT", "/v1/blocks", {"active": [{"name": "code"}, {"name": "wide"}]}),
                               ("POST", "/v1/blocks/code", {"weight": 1e30}), ("POST", "/v1/blocks/escape", {})]:
        r = c.request(method, path, json=body)
        assert 400 <= r.status_code < 500, r.text
        assert _same(live, snap)
    assert c.post("/v1/blocks/code", json={}).status_code == 200 and not _same(live, snap)  # a change does change
    live.set_active([])


# ------------------------------------------------------------------------- 14: blame the right thing


def test_nan_temperature_says_finite(base):
    r = _raw_json(client_for(base), "/v1/completions", '{"prompt": "x", "temperature": NaN}')
    assert r.status_code == 422 and r.json()["error"]["param"] == "temperature"
    assert "finite" in r.json()["error"]["message"]


def test_a_prompt_over_the_context_blames_the_prompt(base):
    c = client_for(base, limit=64)
    long = "The quick brown fox jumps over the lazy dog 0123456789 times. " * 60
    r = c.post("/v1/completions", json={"prompt": long, "max_tokens": 2})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "prompt", r.text
    assert "the prompt is" in error["message"] and "context of 512 tokens" in error["message"]
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": long}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_max_tokens_is_cut_to_the_context_only_when_not_given(base):
    c = client_for(base, limit=64)
    from lorablocks.serving.generation import encode_chat

    def left_after(text: str) -> int:
        return 512 - len(encode_chat(base.composed.tokenizer, [{"role": "user", "content": text}]))

    near = next("fox dog " * n for n in range(1, 400) if 0 < left_after("fox dog " * n) < 40)  # leaves < 64
    left = left_after(near)
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": near}], "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= left, r.text
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": near}], "max_tokens": 64})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "max_tokens" and f"room for {left}" in error["message"]


def test_max_tokens_and_max_completion_tokens_must_agree(base):
    c = client_for(base)
    chat = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    r = c.post("/v1/chat/completions", json={**chat, "max_tokens": 2, "max_completion_tokens": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"
    assert "differ" in r.json()["error"]["message"]
    r = c.post("/v1/chat/completions", json={**chat, "max_tokens": 2, "max_completion_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


def test_an_overflowing_weight_blames_that_blocks_weight(base):
    c = client_for(base)
    r = c.put("/v1/blocks", json={"active": [{"name": "math"}, {"name": "words", "weight": 1e30}]})
    error = r.json()["error"]
    assert r.status_code == 422 and error["param"] == "active.1.weight" and "'words'" in error["message"]
    r = c.post("/v1/blocks/words", json={"weight": -1e30})
    assert r.status_code == 422 and r.json()["error"]["param"] == "weight"
    assert base.fingerprint == "base"

