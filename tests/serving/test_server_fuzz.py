"""A seeded fuzz of the server: random methods, paths, block names, headers (Host, Content-Type, keys), bodies
(mutated valid requests, junk JSON, bytes, bodies over the cap). Every answer is a 2xx or a 4xx, never a
500 or an exception out of the app; every error is one JSON line and one log line, none a traceback; a
refused request leaves the composition, its fingerprint and the merged weights as they were; ``/health``
answers after every batch."""

from __future__ import annotations

import json
import logging
import os
import random
import string
from pathlib import Path
from urllib.parse import quote

import pytest
import torch
from fastapi.testclient import TestClient

from lorablocks.model.merge import target_weight
from lorablocks.serving.guard import Access, is_change
from lorablocks.serving.live import Runner
from lorablocks.serving.server import AppSettings, create_app
from tests.tiny_models import make_peft_adapter

#: LORABLOCKS_FUZZ_SEED and LORABLOCKS_FUZZ_CASES explore further (the default run is the seeded one CI runs)
SEED = int(os.environ.get("LORABLOCKS_FUZZ_SEED", "1414"))
CASES = int(os.environ.get("LORABLOCKS_FUZZ_CASES", "1000"))
BATCH, CAP = 50, 16384
MODULE = "model.layers.1.mlp.down_proj"
NAMES = ["math", "words", "corrupt", "loop", "escape", "nope", "", ".", "..", ".hidden", "a/b", "ma th",
         "\u00e9t\u00e9", "x" * 300, "%2e%2e", "math\x00", "\ud800", "CON"]


@pytest.fixture(scope="module")
def fuzz_live(model_dir: Path, blocks_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from lorablocks.model.session import ComposedModel
    from lorablocks.serving.blocks import BlockLibrary
    from lorablocks.serving.live import LiveModel

    root = tmp_path_factory.mktemp("fuzzblocks")
    make_peft_adapter("llama", root / "math", seed=21)
    make_peft_adapter("llama", root / "words", seed=22)
    make_peft_adapter("llama", root / "corrupt", seed=23)
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    os.symlink(root / "loop", root / "loop")
    os.symlink(blocks_dir / "code", root / "escape")
    return LiveModel(ComposedModel.load(str(model_dir)), BlockLibrary(root))


# ----------------------------------------------------------------------------------------- generators


def _text(rng: random.Random, n: int = 12) -> str:
    pools = [string.printable, "\u00e9\u4e2d\U0001f600\u200b\ufeff", "\ud800\udfff\x00\x7f\n\r\t"]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, n)))


def _junk(rng: random.Random, depth: int = 0):
    makers = [lambda: None, lambda: True, lambda: rng.randint(-3, 5), lambda: "NaN", lambda: "",
              lambda: rng.choice([0.0, -1.5, 1e-300, 1e30, 1e308, float("nan"), float("inf")]),
              lambda: _text(rng), lambda: 10 ** rng.randint(10, 40),
              lambda: [_junk(rng, depth + 1) for _ in range(rng.randint(0, 3))],
              lambda: {_text(rng, 5): _junk(rng, depth + 1) for _ in range(rng.randint(0, 3))}]
    return rng.choice(makers if depth < 3 else makers[:-2])()


def _mutate(rng: random.Random, body: dict) -> dict:
    body = dict(body)
    for _ in range(rng.randint(0, 2)):
        op, key = rng.random(), rng.choice(list(body) or ["x"])
        if op < 0.3:
            body.pop(key, None)
        elif op < 0.7:
            body[key] = _junk(rng)
        else:
            body[rng.choice(["n", "stream", "stop", "seed", "top_p", "logprobs", "user", "stream_options",
                             _text(rng, 6)])] = _junk(rng)
    return body


def _body(rng: random.Random, path: str):
    """A JSON body for ``path``: valid most of the time, mutated often."""
    sample = {"max_tokens": rng.randint(1, 3), "temperature": rng.choice([0, 0.7, 1e-300, 2.0]), "seed": 7}
    if path == "/v1/completions":
        body = {"prompt": rng.choice(["Question:", _text(rng), ["x"], "word " * rng.randint(1, 30)]), **sample}
    elif path == "/v1/chat/completions":
        content = rng.choice(["hi", _text(rng), [{"type": "text", "text": _text(rng)}]])
        body = {"messages": [{"role": rng.choice(["user", "system", "assistant", "tool"]), "content": content}],
                **sample}
    elif path == "/v1/blocks":
        body = {"active": [{"name": rng.choice(NAMES[:3]) if rng.random() < 0.7 else rng.choice(NAMES),
                            "weight": rng.choice([1.0, -0.5, 0.0, 2.5])} for _ in range(rng.randint(0, 3))]}
    else:
        body = {"weight": rng.choice([1.0, 0.5, -1.0, 1e30])}
    return _mutate(rng, body) if rng.random() < 0.5 else body


def _request(rng: random.Random) -> tuple[str, str, bytes, dict[str, str]]:
    """A real endpoint with a fitting method, host and body, then (often) one or more of them made wrong."""
    name, junk = (quote(t.encode("utf-8", "surrogatepass"), safe="%") for t in (rng.choice(NAMES), _text(rng, 8)))
    if rng.random() < 0.6:
        name = rng.choice(NAMES[:2])
    method, path = rng.choice([("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("PUT", "/v1/blocks"),
                               ("POST", f"/v1/blocks/{name}"), ("POST", f"/v1/blocks/{name}"),
                               ("DELETE", f"/v1/blocks/{name}"), ("GET", "/v1/blocks"), ("GET", "/health"),
                               ("GET", "/v1/models")])
    if rng.random() < 0.15:
        method = rng.choice(["POST", "PUT", "GET", "DELETE", "PATCH", "OPTIONS", "HEAD"])
    if rng.random() < 0.1:
        path = rng.choice(["/v1/nothing", "/docs", "/" + junk, "/v1/blocks/", "//v1/blocks", "/v1/blocks/a/b"])
    roll = rng.random()
    if roll < 0.8:
        body = json.dumps(_body(rng, path)).encode()
    elif roll < 0.88:
        body = rng.choice([b"", b"{", b"[" * 3000, b"null", b'{"prompt": "\\ud800"}', b"\xff\xfe{}", b"[1, 2]"])
    elif roll < 0.94:
        body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
    else:
        body = b'{"prompt": "' + b"a" * rng.choice([CAP - 40, CAP + 1, 4 * CAP]) + b'", "max_tokens": 1}'
    headers = {"host": rng.choice(["127.0.0.1", "localhost:8000", "[::1]:1"])}
    if rng.random() < 0.1:
        headers["host"] = rng.choice(["evil.example", "a:b:c", "127.0.0.1.nip.io", "[::1", "", "localhost:x"])
    headers["content-type"] = "application/json"
    if rng.random() < 0.1:
        headers["content-type"] = rng.choice(["application/json; charset=utf-8", "text/plain", "", "*/*",
                                              "application/x-www-form-urlencoded", "multipart/form-data"])
    if rng.random() < 0.05:
        headers["authorization"] = rng.choice(["Bearer x", "Basic abc", "Bearer", ""])
    return method, path, body, headers


# --------------------------------------------------------------------------------------------- the fuzz


def _state(live) -> tuple[str, tuple, torch.Tensor]:
    return live.fingerprint, live.active, target_weight(live.composed.model, MODULE)[0].detach().clone()


def test_server_fuzz(fuzz_live, caplog):
    live, rng = fuzz_live, random.Random(SEED)
    app = create_app(live, Runner(1, 8), AppSettings(model_name="tiny", access=Access(max_body_bytes=CAP),
                                                     max_tokens_limit=3, default_max_tokens=2))
    client = TestClient(app, base_url="http://127.0.0.1", client=("127.0.0.1", 40000))  # raises what escapes
    caplog.set_level(logging.WARNING)
    statuses, changes, errors = [], 0, 0
    fp, active, weight = _state(live)
    for case in range(CASES):
        method, path, body, headers = _request(rng)
        r = client.request(method, path, content=body, headers=headers)
        where = f"case {case}: {method} {path} {headers} {body[:120]!r} -> {r.status_code} {r.text[:200]}"
        assert r.status_code < 500, where
        statuses.append(r.status_code)
        if r.status_code >= 400:
            errors += 1
            if method != "HEAD":
                message = r.json()["error"]["message"]
                assert message and "\n" not in message and r.json()["error"]["code"] == r.status_code, where
        if r.status_code >= 400 or not is_change(method, path):  # refused, or not a change: nothing moved
            assert (live.fingerprint, live.active) == (fp, active), where
            assert torch.equal(target_weight(live.composed.model, MODULE)[0], weight), where
        else:
            changes += 1
            assert r.json()["fingerprint"] == live.fingerprint, where
            fp, active, weight = _state(live)
        if case % BATCH == BATCH - 1:
            health = client.get("/health")
            assert health.status_code == 200 and health.json()["fingerprint"] == live.fingerprint
    logged = [rec for rec in caplog.records if rec.name == "lorablocks.serving"]
    assert not any(rec.exc_info or "Traceback" in rec.getMessage() or "Exception in ASGI" in rec.getMessage()
                   or "\n" in rec.getMessage() for rec in caplog.records)
    assert len(logged) == errors  # one line per error, no more, no less
    kinds = set(statuses)
    assert {200, 400, 404, 413, 415, 421, 422} <= kinds, sorted(kinds)  # the fuzz reached every kind of answer
    assert changes >= 20 and statuses.count(200) >= CASES // 10, (changes, statuses.count(200))
    live.set_active([])
