"""Per-request compositions: a request whose ``model`` names blocks (``"a+b:0.5"``) runs unmerged from the blocks'
factors beside the merged default, and its tokens are those of the same composition merged as the default (with
the same fingerprint), whatever the default is and however it changes meanwhile; they share a batch with default
rows; the number held is bounded; bad names get one clear error."""

from __future__ import annotations

import copy
import threading
import time

import httpx
import pytest
import torch

from lorablocks.core.algebra import LowRank
from lorablocks.model.session import ComposedModel
from lorablocks.serving.errors import ModelNotFoundError, RequestError, ServerBusyError
from lorablocks.serving.generation import SamplingParams, encode_prompt, generate_text
from lorablocks.serving.live import LiveModel
from lorablocks.serving.scheduler import Scheduler
from lorablocks.serving.unmerged import RequestCompositions, RowComposition, RowHooks, parse_composition
from tests.conftest import tiny_llama
from tests.serving.conftest import start_server
from tests.serving.test_scheduler import PROMPTS, FakeJob, _lively
from tests.tiny_models import make_peft_adapter

BLOCKS = ("math", "words", "code", "merged-math+words")


def test_parse_composition():
    assert parse_composition("math") == [("math", 1.0)]
    assert parse_composition("math+words:0.5") == [("math", 1.0), ("words", 0.5)]
    assert parse_composition(" math :2 + words:-1e-1") == [("math", 2.0), ("words", -0.1)]
    known = {"merged-math+words", "math", "words"}.__contains__
    assert parse_composition("merged-math+words:0.5+math", known) == [("merged-math+words", 0.5), ("math", 1.0)]
    assert parse_composition("math+words", known) == [("math", 1.0), ("words", 1.0)]
    for bad in ("math+", "+math", "math:x", "math:nan", "math:inf", ":1"):
        with pytest.raises(RequestError, match="model"):
            parse_composition(bad)
    colons = {"v2:final", "math", "a:b+c"}.__contains__  # block names may hold ':' (and '+')
    assert parse_composition("v2:final", colons) == [("v2:final", 1.0)]
    assert parse_composition("v2:final:0.5+math", colons) == [("v2:final", 0.5), ("math", 1.0)]
    assert parse_composition("math+v2:final+a:b+c:-1", colons) == [("math", 1.0), ("v2:final", 1.0), ("a:b+c", -1.0)]
    with pytest.raises(RequestError, match="'final' of block 'v2' is not a number"):
        parse_composition("v2:final")  # without the library's names, ':final' reads as a weight
    def lookups(parts: int) -> int:
        looked: list[str] = []
        name = "n" * 40  # a run can hold only about 7 such parts before it is longer than any block name
        text = f"{name}:1+" * (parts - 1) + name
        assert len(parse_composition(text, lambda n: looked.append(n) or n == name)) == parts
        return len(looked)

    assert lookups(256) < 2.2 * lookups(128)  # runs stop at a name's longest: linear in the parts, not quadratic
    with pytest.raises(RequestError, match="at most 256"):
        parse_composition("a+" * 300 + "a")


def test_hooks_add_the_difference_to_the_default_on_the_rows_given():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(6, 5))
    mine = {"0": LowRank(torch.randn(5, 2, generator=g), torch.randn(2, 6, generator=g))}
    default = {"0": LowRank(torch.randn(5, 3, generator=g), torch.randn(3, 6, generator=g))}
    comp = RowComposition("c", "fp", mine)
    hooks = RowHooks(lin)
    x = torch.randn(4, 3, 6, generator=g)
    with torch.no_grad():
        plain = lin(x)
        with hooks.rows([(torch.tensor([1, 3]), comp.factors(default))]):
            out = lin(x)
    dense = (mine["0"].B @ mine["0"].A - default["0"].B @ default["0"].A).double()
    want = plain.double().clone()
    want[[1, 3]] += x[[1, 3]].double() @ dense.T
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[1], plain[1]) and torch.equal(out[0], plain[0])
    assert not lin[0]._forward_hooks  # registered for the forward only
    with torch.no_grad(), hooks.rows([]):
        assert torch.equal(lin(x), plain)
    same = RowComposition("same", "fp", default)  # the very factors of the default: nothing to add
    with torch.no_grad(), hooks.rows([(None, same.factors(default))]):
        torch.testing.assert_close(lin(x), plain, atol=1e-5, rtol=1e-5)
    assert comp.factors(default) is comp.factors(default)  # kept until the default changes
    assert comp.factors(dict(default)) is not comp.factors(default)


@pytest.fixture(scope="module")
def lively(tok, tmp_path_factory):
    """A lively tiny Llama (greedy output varies) and a library of random blocks made for it."""
    from lorablocks.serving.blocks import BlockLibrary

    model = _lively(tiny_llama, len(tok))
    root = tmp_path_factory.mktemp("rowblocks")
    for i, name in enumerate(BLOCKS):
        make_peft_adapter("llama", root / name, seed=20 + i, model=copy.deepcopy(model), std=0.5)
    return LiveModel(ComposedModel(model, tok), BlockLibrary(root))


def _job(tok, prompt: str, n: int, composition=None, **kw) -> FakeJob:
    job = FakeJob(encode_prompt(tok, prompt, "raw"), SamplingParams(max_new_tokens=n, **kw))
    job.composition = composition
    return job


def _merged(live: LiveModel, entries, job: FakeJob) -> tuple[tuple[str, str, int], str]:
    """``job``'s output and fingerprint with ``entries`` merged as the default (the default is put back after)."""
    before = [(b.name, b.weight) for b in live.active]
    live.set_active(entries)
    try:
        return generate_text(live.composed.model, live.composed.tokenizer, job.ids, job.params), live.fingerprint
    finally:
        live.set_active(before)


def test_a_request_composition_runs_as_if_merged_beside_default_rows(lively, tok):
    scheduler = Scheduler(lively, max_batch=6, queue=8)
    comps = RequestCompositions(lively, scheduler.row_hooks, limit=2)
    try:
        lively.set_active([("code", 1.0)])  # some other default: the rows must not see it
        a = comps.acquire("math+words:0.5")
        b = comps.acquire("merged-math+words:-0.7")
        jobs = [_job(tok, PROMPTS[0], 24, a), _job(tok, PROMPTS[1], 30), _job(tok, PROMPTS[2], 20, b),
                _job(tok, PROMPTS[3], 26, a, temperature=0.9, seed=4), _job(tok, PROMPTS[4], 18)]
        with lively.lock.write():  # all start in one batch
            for job in jobs:
                scheduler.start(job)
        results = [job.result() for job in jobs]
        default_fp = lively.fingerprint
        for job, result, entries in zip(jobs, results, [[("math", 1), ("words", .5)], None,
                                                        [("merged-math+words", -.7)], [("math", 1), ("words", .5)],
                                                        None]):
            if entries is None:
                assert job.fingerprint() == default_fp
                assert result == generate_text(lively.composed.model, tok, job.ids, job.params)
                continue
            want, fp = _merged(lively, entries, job)
            assert result == want and job.fingerprint() == fp != default_fp
        base = _merged(lively, [], jobs[0])[0]
        assert results[0] != base  # the composition changes the answer (nothing passes by default)
        assert results[0] != generate_text(lively.composed.model, tok, jobs[0].ids, jobs[0].params)
    finally:
        scheduler.shutdown()
        lively.set_active([])


def test_a_change_of_default_does_not_cut_a_request_composition(lively, tok):
    scheduler = Scheduler(lively, max_batch=4, queue=4)
    comps = RequestCompositions(lively, scheduler.row_hooks, limit=2)
    try:
        lively.set_active([])
        comp = comps.acquire("words:1.5")
        mine, other = _job(tok, PROMPTS[2], 300, comp), _job(tok, PROMPTS[0], 300)
        slow = lively.composed.model.register_forward_pre_hook(lambda *a: time.sleep(0.004))  # >= 1.2 s each
        try:
            with lively.lock.write():  # both start in one batch
                scheduler.start(mine)
                scheduler.start(other)
            assert mine.started.wait(30) and other.started.wait(30)
            lively.set_active([("math", 1.0)])  # while both run
            text, reason, _ = mine.result()
        finally:
            slow.remove()
        assert other.result()[1] == "composition_changed"
        assert reason != "composition_changed"
        want, fp = _merged(lively, [("words", 1.5)], mine)
        assert (text, reason) == want[:2] and mine.fingerprint() == fp
    finally:
        scheduler.shutdown()
        lively.set_active([])


def test_compositions_are_bounded_and_names_checked(lively):
    comps = RequestCompositions(lively, RowHooks(lively.composed.model), limit=2)
    first, second = comps.acquire("math"), comps.acquire("words:2")
    assert comps.acquire("math") is first  # held, not composed again
    with pytest.raises(ServerBusyError, match="2 per-request compositions"):
        comps.acquire("code")
    comps.release(second)
    third = comps.acquire("code")  # the idle one makes room
    assert {c.spec for c in comps.held()} == {"math", "code"} and third.users == 1
    with pytest.raises(ModelNotFoundError, match="available: code, math"):
        comps.acquire("gpt-4")
    with pytest.raises(ModelNotFoundError):
        comps.acquire("math+../etc")
    with pytest.raises(RequestError, match="off"):
        RequestCompositions(lively, None).acquire("math")


def test_http_a_request_names_its_composition(live, tok):
    server, runner = start_server(live, max_tokens_limit=16, max_batch=4)
    try:
        live.set_active([("code", 1.0)])
        body = {"prompt": PROMPTS[2], "max_tokens": 6, "temperature": 0}
        r = httpx.post(f"{server.url}/v1/completions", json={**body, "model": "math+words:0.5"}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "math+words:0.5"
        fp = r.headers["X-Lorablocks-Fingerprint"]
        assert r.json()["system_fingerprint"] == fp != live.fingerprint
        live.set_active([("math", 1.0), ("words", 0.5)])
        assert fp == live.fingerprint
        merged = httpx.post(f"{server.url}/v1/completions", json={**body, "model": "tiny"}, timeout=60).json()
        assert merged["choices"][0]["text"] == r.json()["choices"][0]["text"]
        missing = httpx.post(f"{server.url}/v1/completions", json={**body, "model": "gpt-4"}, timeout=60)
        assert missing.status_code == 404 and "gpt-4" in missing.json()["error"]["message"]
        bad = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                         json={"model": "math:x", "messages": [{"role": "user", "content": "hi"}]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"
        ids = [m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]]
        assert ids[0] == "tiny" and {"math", "words", "code"} <= set(ids)
    finally:
        server.stop()
        runner.shutdown()
        live.set_active([])


def test_http_503_with_retry_after_when_every_held_composition_is_in_use(live):
    server, runner = start_server(live, max_tokens_limit=4, max_batch=4, max_compositions=1)
    body = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
    answers: list[httpx.Response] = []
    try:
        with live.lock.write():  # the decoding thread waits: the first request holds its composition meanwhile
            first = threading.Thread(target=lambda: answers.append(httpx.post(
                f"{server.url}/v1/completions", json={**body, "model": "math"}, timeout=60)))
            first.start()
            deadline = time.monotonic() + 30
            while httpx.get(f"{server.url}/health", timeout=10).json()["compositions"]["in_use"] < 1:
                assert time.monotonic() < deadline, "the first request never took its composition"
                time.sleep(0.02)
            busy = httpx.post(f"{server.url}/v1/completions", json={**body, "model": "words"}, timeout=60)
            assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
            assert "1 per-request compositions, all in use" in busy.json()["error"]["message"]
        first.join(60)
        assert answers[0].status_code == 200 and answers[0].json()["model"] == "math"
        usage = httpx.get(f"{server.url}/health", timeout=10).json()["compositions"]
        assert usage == {"held": 1, "in_use": 0, "limit": 1}
        again = httpx.post(f"{server.url}/v1/completions", json={**body, "model": "words"}, timeout=60)
        assert again.status_code == 200 and again.json()["model"] == "words"  # the idle one made room
    finally:
        server.stop()
        runner.shutdown()


def test_http_thread_engine_refuses_request_compositions(live):
    server, runner = start_server(live, max_tokens_limit=16, workers=1)
    try:
        r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                       json={"model": "math", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 400 and "off" in r.json()["error"]["message"]
        ids = [m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]]
        assert ids == ["tiny"]
    finally:
        server.stop()
        runner.shutdown()
