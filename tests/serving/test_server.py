"""The server over HTTP on 127.0.0.1: the ``openai`` client unchanged, live composition, exactness bit for bit,
consistency under concurrent requests and changes, every bad input, the API key and the bounded queue."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
import torch

from lorablocks.compose.operations import blocks_of, open_blocks
from lorablocks.model.session import ComposedModel
from lorablocks.serving.blocks import live_recipe
from lorablocks.serving.generation import SamplingParams, encode_prompt, generate_text
from lorablocks.serving.scheduler import CUT_BY_CHANGE
from lorablocks.serving.server import FINGERPRINT_HEADER
from tests.serving.conftest import start_server

PROMPT = "Question: What is two plus three?\nAnswer:"


def _client(server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30)


def _complete(server, max_tokens: int = 10, **kw) -> httpx.Response:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, **kw}
    return httpx.post(server.url + "/v1/completions", json=body, timeout=30)


def _text(server) -> tuple[str, str]:
    r = _complete(server)
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers[FINGERPRINT_HEADER] == body["system_fingerprint"]
    return body["choices"][0]["text"], body["system_fingerprint"]


def _fresh(model_dir, blocks_dir, entries):
    """A freshly loaded model with ``entries`` merged the way ``generate`` does, and the recipe."""
    composed = ComposedModel.load(str(model_dir))
    if entries:
        files = open_blocks([blocks_dir / n for n, _ in entries])
        recipe = live_recipe(blocks_of(files, [w for _, w in entries]))
        composed.apply_recipe(recipe, files)
    return composed


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_openai_client_completions_and_streamed_chat(server):
    client = _client(server)
    ids = [m.id for m in client.models.list().data]  # the server's model first, then its blocks (compositions of one)
    assert ids[0] == "tiny" and {"math", "words", "code"} <= set(ids[1:])
    done = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    assert done.system_fingerprint == "base" and 0 < done.usage.completion_tokens <= 8
    assert done.choices[0].finish_reason in ("stop", "length") and done.usage.prompt_tokens > 0
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What colour is the sky?"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert {c.system_fingerprint for c in chunks} == {"base"}
    streamed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text


def test_a_block_changes_greedy_output_and_removing_it_restores_the_base_exactly(server, live, model_dir):
    base, fp0 = _text(server)
    r = httpx.post(server.url + "/v1/blocks/math", json={"weight": 1.0})
    assert r.status_code == 200 and r.json()["active"] == [{"name": "math", "weight": 1.0}]
    with_math, fp1 = _text(server)
    assert with_math != base and fp1 != fp0 == "base"
    r = httpx.delete(server.url + "/v1/blocks/math")
    assert r.status_code == 200 and r.json()["active"] == [] and r.json()["fingerprint"] == "base"
    assert _text(server) == (base, "base")
    assert _same_weights(live.composed.model, ComposedModel.load(str(model_dir)).model)


def test_put_equals_generate_and_a_fresh_merge_bit_for_bit(server, live, model_dir, blocks_dir, capsys):
    from lorablocks.cli import run_app

    entries = [("math", 1.0), ("words", -0.5), ("code", 0.25)]
    r = httpx.put(server.url + "/v1/blocks", json={"active": [{"name": n, "weight": w} for n, w in entries]})
    state = r.json()
    assert r.status_code == 200 and state["seconds"] >= state["locked_seconds"] > 0
    fresh = _fresh(model_dir, blocks_dir, entries)
    assert state["fingerprint"] == fresh.fingerprint == live.composed.fingerprint
    assert _same_weights(live.composed.model, fresh.model)
    served, fp = _text(server)
    assert fp == fresh.fingerprint
    capsys.readouterr()
    argv = ["generate", "--model", str(model_dir), "--raw", "--max-new-tokens", "10", "--weights", "1,-0.5,0.25"]
    for n, _ in entries:
        argv += ["--adapter", str(blocks_dir / n)]
    assert run_app(argv + [PROMPT]) == 0
    out = capsys.readouterr()
    assert out.out == served + "\n" and fresh.fingerprint[:12] in out.err


def test_any_sequence_of_changes_ends_bit_identical_to_a_fresh_merge(server, live, model_dir, blocks_dir):
    url = server.url + "/v1/blocks"
    for _ in range(3):
        httpx.post(url + "/math", json={"weight": 1.0})
        httpx.post(url + "/words", json={"weight": -2.0})
        httpx.post(url + "/math", json={"weight": 0.3})
        httpx.post(url + "/code", json={})
        httpx.delete(url + "/words")
    assert httpx.get(url).json()["active"] == [{"name": "math", "weight": 0.3}, {"name": "code", "weight": 1.0}]
    assert _same_weights(live.composed.model, _fresh(model_dir, blocks_dir, [("math", 0.3), ("code", 1.0)]).model)
    assert httpx.put(url, json={"active": []}).json()["fingerprint"] == "base"
    assert _same_weights(live.composed.model, ComposedModel.load(str(model_dir)).model)


def _expected_outputs(model_dir, blocks_dir, compositions, max_tokens):
    out = {}
    for entries in compositions:
        fresh = _fresh(model_dir, blocks_dir, entries)
        ids = encode_prompt(fresh.tokenizer, PROMPT, "raw")
        out[fresh.fingerprint or "base"] = generate_text(fresh.model, fresh.tokenizer, ids,
                                                         SamplingParams(max_new_tokens=max_tokens))[0]
    return out


def _stream_text(url: str, body: dict) -> tuple[str, set[str], str | None]:
    """The streamed text, every fingerprint it reported, and its finish reason."""
    text, fps, finish = [], set(), None
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        assert r.status_code == 200
        fps.add(r.headers[FINGERPRINT_HEADER])
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                text.append(event["choices"][0]["text"])
                finish = event["choices"][0]["finish_reason"] or finish
                fps.add(event["system_fingerprint"])
    return "".join(text), fps, finish


@pytest.mark.parametrize("engine", ["batching", "threads"])
def test_concurrent_requests_during_changes_match_the_composition_they_report(server, live, model_dir, blocks_dir,
                                                                              engine):
    """Every answer is the greedy output of the composition it reports; batched, one cut by a change is a prefix
    of it (finish_reason composition_changed); on threads, changes wait and nothing is cut."""
    if engine == "threads":
        server, _ = start_server(live, max_tokens_limit=64, workers=2)
    try:
        _concurrent_changes(server, model_dir, blocks_dir, cut_allowed=engine == "batching")
    finally:
        if engine == "threads":
            server.stop()


def _concurrent_changes(server, model_dir, blocks_dir, cut_allowed: bool) -> None:
    compositions = [[], [("math", 1.0)], [("math", 1.0), ("words", 0.5)], [("code", -1.0)]]
    expected = _expected_outputs(model_dir, blocks_dir, compositions, max_tokens=12)
    assert len(set(expected.values())) == len(compositions)  # the compositions are distinguishable
    results, errors, done = [], [], threading.Event()
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}

    def client(i: int) -> None:
        try:
            for j in range(6):
                if (i + j) % 2:
                    text, fps, finish = _stream_text(server.url, body)
                    assert len(fps) == 1
                    results.append((fps.pop(), text, finish))
                else:
                    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
                    assert r.status_code == 200, r.text
                    choice = r.json()["choices"][0]
                    results.append((r.json()["system_fingerprint"], choice["text"], choice["finish_reason"]))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def changer() -> None:
        k = 0
        while not done.is_set() and k < 200:
            entries = compositions[k % len(compositions)]
            r = httpx.put(server.url + "/v1/blocks", timeout=30,
                          json={"active": [{"name": n, "weight": w} for n, w in entries]})
            if r.status_code != 200:
                errors.append(AssertionError(r.text))
            k += 1
            time.sleep(0.005)

    clients = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    change = threading.Thread(target=changer)
    change.start()
    for t in clients:
        t.start()
    for t in clients:
        t.join(120)
    done.set()
    change.join(30)
    assert not errors, errors[0]
    assert len(results) == 24
    whole = [(fp, text) for fp, text, finish in results if finish != CUT_BY_CHANGE]
    assert all(text == expected[fp] for fp, text in whole)
    assert all(expected[fp].startswith(text) for fp, text, _ in results)
    assert cut_allowed or len(whole) == len(results)
    assert len({fp for fp, _, _ in results}) > 1  # requests really ran under different compositions


def test_a_change_waits_for_running_generations_and_holds_new_ones(server, live):
    changed, answered = [], []
    with live.reading():  # a generation in progress
        change = threading.Thread(target=lambda: changed.append(httpx.put(
            server.url + "/v1/blocks", timeout=30, json={"active": [{"name": "math"}]})))
        change.start()
        deadline = time.monotonic() + 20
        while live.lock._writers_waiting == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        request = threading.Thread(target=lambda: answered.append(_complete(server, 4)))
        request.start()
        time.sleep(0.3)
        assert not changed and not answered and live.fingerprint == "base"
    change.join(30)
    request.join(30)
    assert changed[0].status_code == 200 and answered[0].status_code == 200
    assert answered[0].json()["system_fingerprint"] == changed[0].json()["fingerprint"] != "base"


def test_a_client_that_goes_away_mid_stream_frees_its_slot(server, live):
    runner = server.server.config.app.state.runner
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 64, "temperature": 0, "stream": True}
    for _ in range(3):
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
            next(line for line in r.iter_lines() if line.startswith("data: "))
    deadline = time.monotonic() + 20
    while runner._admitted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runner._admitted == 0
    assert _text(server)[1] == "base"


BAD_REQUESTS = [
    ("POST", "/v1/completions", b"{not json", 400, "not valid JSON"),
    ("POST", "/v1/completions", b"[1, 2]", 422, "request body"),
    ("POST", "/v1/completions", {"prompt": 3}, 422, "prompt"),
    ("POST", "/v1/completions", {"prompt": "x", "temperature": "hot"}, 422, "temperature"),
    ("POST", "/v1/completions", {"prompt": "x", "temperature": -1}, 422, "temperature"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 65}, 400, "limit of 64"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 422, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "x", "n": 2}, 400, "n must be 1"),
    ("POST", "/v1/completions", {"prompt": ["a", "b"]}, 400, "one prompt"),
    ("POST", "/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("POST", "/v1/chat/completions", {"messages": []}, 422, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 422, "messages.0.role"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 99},
     400, "limit"),
    ("PUT", "/v1/blocks", {"active": [{"name": "nope"}]}, 404, "no block named 'nope'"),
    ("PUT", "/v1/blocks", {"active": [{"name": "../math"}]}, 400, "not a plain folder name"),
    ("PUT", "/v1/blocks", {"active": [{"name": "escape"}]}, 400, "outside the blocks folder"),
    ("PUT", "/v1/blocks", {"active": [{"name": "linkedfile"}]}, 400, "outside the blocks folder"),
    ("PUT", "/v1/blocks", {"active": [{"name": "math"}, {"name": "math"}]}, 422, "twice"),
    ("PUT", "/v1/blocks", {"active": [{"name": "wide"}]}, 422, "another base model"),
    ("PUT", "/v1/blocks", {"active": [{"name": "gpt2block"}]}, 422, "has no module"),
    ("PUT", "/v1/blocks", {"active": [{"name": "othermodel"}]}, 422, "openai-community/gpt2"),
    ("PUT", "/v1/blocks", {"active": [{"name": "corrupt"}]}, 422, "corrupt"),
    ("PUT", "/v1/blocks", {"active": [{"name": "math", "weight": "NaN"}]}, 422, "finite"),
    ("PUT", "/v1/blocks", {"blocks": []}, 422, "active"),
    ("PUT", "/v1/blocks", b"", 422, "JSON object body"),
    ("POST", "/v1/blocks/nope", {"weight": 1}, 404, "no block named"),
    ("POST", "/v1/blocks/..%2Fmath", {}, 400, "not a plain folder name"),
    ("POST", "/v1/blocks/%2E%2E", {}, 400, "not a plain folder name"),
    ("POST", "/v1/blocks/math", {"weight": "lots"}, 422, "weight"),
    ("POST", "/v1/blocks/corrupt", {}, 422, "corrupt"),
    ("DELETE", "/v1/blocks/words", None, 404, "not active"),
    ("DELETE", "/v1/blocks/nope", None, 404, "no block named"),
    ("GET", "/v1/nothing", None, 404, "Not Found"),
]


@pytest.mark.parametrize("method, path, body, status, message", BAD_REQUESTS,
                         ids=[f"{m} {p} {s}" for m, p, _, s, _ in BAD_REQUESTS])
def test_bad_input_gets_one_clear_message_and_changes_nothing(server, live, method, path, body, status, message):
    httpx.post(server.url + "/v1/blocks/math", json={"weight": 1.0})
    before = live.fingerprint
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else \
        ({"json": body} if body is not None else {})
    r = httpx.request(method, server.url + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and "\n" not in error["message"] and error["code"] == status
    assert live.fingerprint == before
    assert _text(server)[1] == before  # still serving
    assert httpx.get(server.url + "/v1/blocks").status_code == 200


def test_openai_client_sees_the_errors(server):
    client = _client(server)
    with pytest.raises(openai.BadRequestError, match="limit of 64"):
        client.completions.create(model="tiny", prompt="x", max_tokens=1000)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="tiny", prompt="x", top_p=5)


def test_api_key_guards_every_endpoint(live):
    server, _ = start_server(live, api_key="s3cret")
    live.set_active([("math", 1.0)])
    try:
        for method, path in [("GET", "/v1/models"), ("GET", "/v1/blocks"), ("PUT", "/v1/blocks"),
                             ("POST", "/v1/completions"), ("DELETE", "/v1/blocks/math"), ("GET", "/docs")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = httpx.request(method, server.url + path, headers=headers, json={"active": []}, timeout=30)
                assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        assert [b.name for b in live.active] == ["math"]  # the refused PUT and DELETE changed nothing
        with pytest.raises(openai.AuthenticationError):
            _client(server, "wrong").models.list()
        done = _client(server, "s3cret").completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0)
        assert done.choices[0].text is not None
    finally:
        server.stop()
        live.set_active([])


def test_a_full_queue_answers_503_and_the_server_recovers(live):
    server, runner = start_server(live, workers=1, queue=0)
    first: list[httpx.Response] = []
    try:
        with live.lock.write():  # hold generations still, as a long change would
            t = threading.Thread(target=lambda: first.append(_complete(server, 3)))
            t.start()
            deadline = time.monotonic() + 20
            while runner._admitted < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            r = _complete(server, 3)
            assert r.status_code == 503 and "busy" in r.json()["error"]["message"]
        t.join(30)
        assert first[0].status_code == 200
        assert _complete(server, 3).status_code == 200
    finally:
        server.stop()
