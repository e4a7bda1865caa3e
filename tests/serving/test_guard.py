"""What every request passes first (issue 14, items 5-8): JSON-only bodies, the Host allow-list, the body cap
(enforced while the body arrives, over a real socket) with tokenizing off the event loop, and the admin key."""

from __future__ import annotations

import socket
import threading

import httpx
import pytest
from fastapi.testclient import TestClient

from lorablocks.errors import LoraBlocksError
from lorablocks.serving.guard import Access
from lorablocks.serving.live import Runner
from lorablocks.serving.server import AppSettings, ServeSettings, create_app
from tests.serving.conftest import start_server


def client_for(live, host: str = "127.0.0.1", peer: str = "127.0.0.1", **access) -> TestClient:
    """A TestClient on ``live`` whose requests say ``Host: host`` and come from ``peer``."""
    app = create_app(live, Runner(1, 4), AppSettings(model_name="tiny", access=Access(**access), max_tokens_limit=8))
    return TestClient(app, base_url=f"http://{host}", client=(peer, 40000))


@pytest.fixture
def base(live):
    live.set_active([])
    yield live
    live.set_active([])


def _unchanged(live, before) -> bool:
    return live.fingerprint == before and not live.active


# ------------------------------------------------------------------------ 5: state changes take JSON only


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None, "application/jsonx"])
def test_a_change_without_a_json_body_type_is_refused_415(base, content_type):
    c = client_for(base)
    headers = {"content-type": content_type} if content_type else {}
    for method, path, body in [("POST", "/v1/blocks/math", b""), ("POST", "/v1/blocks/math", b'{"weight": 1}'),
                               ("PUT", "/v1/blocks", b'{"active": [{"name": "math"}]}')]:
        r = c.request(method, path, content=body, headers=headers)
        assert r.status_code == 415, r.text
        assert "application/json" in r.json()["error"]["message"]
        assert _unchanged(base, "base")
    r = c.post("/v1/blocks/math", content=b"", headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200 and base.active[0].name == "math"  # the same request as JSON goes through


# ------------------------------------------------------------------------------ 6: the Host allow-list


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil"])
def test_a_foreign_host_name_is_refused_421_on_every_endpoint(base, host):
    c = client_for(base, host=host)
    for method, path, body in [("GET", "/health", None), ("GET", "/v1/models", None), ("GET", "/v1/blocks", None),
                               ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}),
                               ("POST", "/v1/blocks/math", {}), ("PUT", "/v1/blocks", {"active": [{"name": "math"}]}),
                               ("DELETE", "/v1/blocks/math", None)]:
        r = c.request(method, path, json=body)
        assert r.status_code == 421, (method, path, r.text)
        assert "host name" in r.json()["error"]["message"]
    assert _unchanged(base, "base")


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost", "LOCALHOST:1", "[::1]:8000", "my.box:80"])
def test_own_and_listed_host_names_are_accepted(base, host):
    c = client_for(base, host=host, hosts=("my.box",))
    assert c.get("/health").status_code == 200
    assert c.post("/v1/blocks/math", json={}).status_code == 200


def test_the_hosts_follow_the_bound_address():
    one = ServeSettings(blocks=".", host="10.1.2.3", allowed_hosts=("team.example",)).access("10.1.2.3")
    assert one.allows_host("10.1.2.3") and one.allows_host("team.example") and one.allows_host("localhost")
    assert not one.allows_host("10.9.9.9") and not one.allows_host("evil.example")
    every = ServeSettings(blocks=".", host="0.0.0.0").access("0.0.0.0")  # every interface: any address, no names
    assert every.allows_host("10.9.9.9") and every.allows_host("fe80::1") and not every.allows_host("evil.example")


def test_a_missing_or_malformed_host_is_refused_400(base):
    c = client_for(base)
    assert c.get("/health", headers={"host": "a:b:c"}).status_code == 400
    assert c.get("/health", headers={"host": "[::1"}).status_code == 400


# ----------------------------------------------------------- 7: the body cap, while the body still arrives


def _raw(url: str, head: bytes, body_parts: list[bytes]) -> bytes:
    """Send ``head`` and ``body_parts`` without finishing the body; what the server answers (10 s at most)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head)
        for part in body_parts:
            s.sendall(part)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def test_a_body_over_the_cap_is_refused_before_it_is_read(live):
    server, _ = start_server(live, max_body_bytes=4096)
    try:
        path = "/v1/completions"
        declared = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    "Content-Length: 50000000\r\n\r\n").encode()
        answer = _raw(server.url, declared, [b"{"])  # 50 MB announced, 1 byte sent: answered at once
        assert answer.startswith(b"HTTP/1.1 413")
        chunked = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   "Transfer-Encoding: chunked\r\n\r\n").encode()
        chunk = b"400\r\n" + b" " * 1024 + b"\r\n"  # 1 KiB chunks, no Content-Length, never finished
        answer = _raw(server.url, chunked, [chunk] * 5)
        assert answer.startswith(b"HTTP/1.1 413")
        r = httpx.post(server.url + path, json={"prompt": "x", "max_tokens": 1, "user": "u" * 3000}, timeout=30)
        assert r.status_code == 200, r.text  # under the cap
        r = httpx.post(server.url + path, json={"prompt": "x", "max_tokens": 1, "user": "u" * 5000}, timeout=30)
        assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]
    finally:
        server.stop()


def test_tokenizing_runs_off_the_event_loop(live, monkeypatch):
    import lorablocks.serving.routes as routes

    entered, release, real = threading.Event(), threading.Event(), routes.encode_prompt

    def slow_encode(*args, **kwargs):
        entered.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(routes, "encode_prompt", slow_encode)
    server, _ = start_server(live)
    done: list[httpx.Response] = []
    try:
        t = threading.Thread(target=lambda: done.append(httpx.post(
            server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=60)))
        t.start()
        assert entered.wait(30)
        health = httpx.get(server.url + "/health", timeout=10)  # answered while the tokenizer is busy
        assert health.status_code == 200 and not done
        release.set()
        t.join(60)
        assert done[0].status_code == 200
    finally:
        release.set()
        server.stop()


# ---------------------------------------------------------------------------------- 8: the admin key


def test_the_api_key_generates_and_only_the_admin_key_changes(base):
    c = client_for(base, api_key="user-key", admin_key="admin-key")
    user, admin = {"Authorization": "Bearer user-key"}, {"Authorization": "Bearer admin-key"}
    assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=user).status_code == 200
    assert c.get("/v1/blocks", headers=user).status_code == 200
    assert c.get("/v1/blocks").status_code == 401
    r = c.put("/v1/blocks", json={"active": [{"name": "math"}]}, headers=user)
    assert r.status_code == 403 and "admin key" in r.json()["error"]["message"]
    assert c.post("/v1/blocks/math", json={}, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert _unchanged(base, "base")
    assert c.post("/v1/blocks/math", json={}, headers=admin).status_code == 200 and base.active
    assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=admin).status_code == 200


def test_an_api_key_without_an_admin_key_takes_no_changes(base):
    c = client_for(base, api_key="user-key")
    r = c.post("/v1/blocks/math", json={}, headers={"Authorization": "Bearer user-key"})
    assert r.status_code == 403 and "no admin key" in r.json()["error"]["message"]
    assert _unchanged(base, "base")


def test_without_keys_changes_come_only_from_this_machine(base):
    remote = client_for(base, peer="10.0.0.7")
    assert remote.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200
    r = remote.post("/v1/blocks/math", json={})
    assert r.status_code == 403 and "only from this machine" in r.json()["error"]["message"]
    assert remote.delete("/v1/blocks/math").status_code == 403
    assert _unchanged(base, "base")
    for peer in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        assert client_for(base, peer=peer).post("/v1/blocks/math", json={"weight": 0.5}).status_code == 200


@pytest.mark.parametrize("access, message", [({"api_key": ""}, "API key"), ({"admin_key": ""}, "admin key"),
                                             ({"api_key": "two words"}, "API key"),
                                             ({"api_key": "same", "admin_key": "same"}, "must differ"),
                                             ({"max_body_bytes": 0}, "body limit")])
def test_empty_or_unusable_keys_are_refused(access, message):
    with pytest.raises(LoraBlocksError, match=message):
        Access(**access)


def test_serve_refuses_an_empty_api_key_before_listening(model_dir, blocks_dir, capsys):
    from lorablocks.cli import run_app

    with socket.create_server(("127.0.0.1", 0)) as busy:  # were the key accepted, binding would fail after loading
        port = str(busy.getsockname()[1])
        for flags, message in [(["--api-key", ""], "--api-key"), (["--admin-key", ""], "--admin-key"),
                               (["--api-key", "k", "--admin-key", "k"], "must differ"),
                               (["--max-body-bytes", "0"], "--max-body-bytes")]:
            code = run_app(["serve", "--model", str(model_dir), "--blocks", str(blocks_dir), "--port", port, *flags])
            err = capsys.readouterr().err
            assert code == 2 and message in err and "cannot listen" not in err, err
