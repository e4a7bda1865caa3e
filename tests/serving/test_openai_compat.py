"""OpenAI compatibility where clients hit it first (issue 16): ``null`` means the default, tool messages and
assistant ``content: null`` in history, 400 (not silence) for fields that would change the answer, a chat
template that refuses the messages, ``Retry-After`` on 503."""

from __future__ import annotations

import threading

import openai
import pytest
from fastapi.testclient import TestClient

from lorablocks.serving.guard import Access
from lorablocks.serving.live import Runner
from lorablocks.serving.server import AppSettings, create_app
from tests.serving.conftest import start_server

CHAT = [{"role": "user", "content": "hi"}]


def client_for(live, runner: Runner | None = None) -> TestClient:
    app = create_app(live, runner or Runner(1, 4), AppSettings(model_name="tiny", access=Access(),
                                                               max_tokens_limit=8))
    return TestClient(app, base_url="http://127.0.0.1", client=("127.0.0.1", 40000))


def test_null_optional_fields_take_their_defaults(live):
    c = client_for(live)
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None, "stop": None, "seed": None,
             "stream_options": None, "logprobs": None, "tools": None, "presence_penalty": None, "user": None}
    r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, **nulls})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2, r.text
    r = c.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": None, "max_completion_tokens": 2, **nulls})
    assert r.status_code == 200, r.text
    r = c.post("/v1/completions", json={"prompt": None})
    assert r.status_code == 422 and r.json()["error"]["param"] == "prompt"  # a required field stays required


def test_tool_messages_and_null_assistant_content_in_history(live):
    c = client_for(live)
    history = [{"role": "user", "content": "What is 2 + 2?"},
               {"role": "assistant", "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "4"}]
    r = c.post("/v1/chat/completions", json={"messages": history, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": None}]})
    assert r.status_code == 422 and "needs content" in r.json()["error"]["message"]
    assert "Value error" not in r.json()["error"]["message"]


UNSUPPORTED = [("/v1/chat/completions", "logprobs", True), ("/v1/completions", "logprobs", 0),
               ("/v1/chat/completions", "top_logprobs", 3), ("/v1/chat/completions", "n", 2),
               ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
               ("/v1/chat/completions", "tool_choice", "auto"),
               ("/v1/chat/completions", "response_format", {"type": "json_object"}),
               ("/v1/completions", "logit_bias", {"5": 10}), ("/v1/completions", "presence_penalty", 0.5),
               ("/v1/completions", "frequency_penalty", -1), ("/v1/completions", "best_of", 2),
               ("/v1/completions", "echo", True), ("/v1/completions", "suffix", "end")]


@pytest.mark.parametrize("path, field, value", UNSUPPORTED, ids=[f"{p[4:]} {f}" for p, f, _ in UNSUPPORTED])
def test_a_field_that_would_change_the_answer_is_refused(live, path, field, value):
    body = {"prompt": "x"} if path == "/v1/completions" else {"messages": CHAT}
    r = client_for(live).post(path, json={**body, "max_tokens": 1, field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


@pytest.mark.parametrize("field, value", [("logprobs", False), ("tools", []), ("presence_penalty", 0),
                                          ("frequency_penalty", 0.0), ("response_format", {"type": "text"}),
                                          ("tool_choice", "none"), ("logit_bias", {}), ("n", 1)])
def test_neutral_values_of_those_fields_are_accepted(live, field, value):
    r = client_for(live).post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1, field: value})
    assert r.status_code == 200, r.text


def test_the_openai_client_sees_unsupported_tools(live):
    server, _ = start_server(live, max_tokens_limit=8)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
        with pytest.raises(openai.BadRequestError, match="tools is not supported"):
            client.chat.completions.create(model="tiny", messages=CHAT, tools=tools, max_tokens=2)
    finally:
        server.stop()


def test_a_chat_template_that_refuses_the_messages_is_a_400(live, monkeypatch):
    tokenizer = live.composed.tokenizer
    monkeypatch.setattr(tokenizer, "chat_template", "{{ raise_exception('roles must alternate user/assistant') }}",
                        raising=False)
    r = client_for(live).post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "roles must alternate" in r.json()["error"]["message"]


def test_a_full_queue_says_when_to_retry(live):
    runner, release = Runner(1, 0), threading.Event()
    runner.submit(lambda: release.wait(30))  # the only slot, taken
    try:
        r = client_for(live, runner).post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
    finally:
        release.set()
        runner.shutdown()
