"""Continuous batching: a sequence's logits in a left-padded batch are its logits alone (round-off), so every
request's output in a batch (greedy, seeded sampling, stop strings, joining and leaving at any step) equals
its output alone; a change of composition applies between steps and cuts the running requests; cancelled
requests leave; the queue is bounded; a failing request fails alone."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest
import torch

from lorablocks.model.session import ComposedModel
from lorablocks.serving.errors import ServerBusyError
from lorablocks.serving.generation import SamplingParams, cache_of, encode_prompt, generate_text
from lorablocks.serving.live import LiveModel
from lorablocks.serving.scheduler import CUT_BY_CHANGE, BatchCache, Scheduler
from tests.conftest import tiny_gpt2, tiny_llama
from tests.serving.conftest import start_server

PROMPTS = ["The quick brown fox", "a", "Question: What is two plus three?\nAnswer:", "sky blue dog doctor banker",
           "x y", "number alpha beta gamma delta sky"]


class FakeJob:
    """A job that records its events (the scheduler's thread writes, the test reads after ``ended``)."""

    def __init__(self, ids: list[int], params: SamplingParams) -> None:
        self.ids, self.params, self.cancelled = ids, params, threading.Event()
        self.events: list[tuple[str, Any]] = []
        self.ended, self.started = threading.Event(), threading.Event()

    def put(self, kind: str, value: Any = None) -> None:
        self.events.append((kind, value))
        if kind == "start":
            self.started.set()
        if kind == "end":
            self.ended.set()

    def chunks(self) -> list[Any]:
        return [v for k, v in self.events if k == "chunk"]

    def result(self) -> tuple[str, str, int]:
        assert self.ended.wait(60), "the job did not end"
        chunks = self.chunks()
        return "".join(c.text for c in chunks), chunks[-1].finish_reason, chunks[-1].tokens

    def fingerprint(self) -> str:
        return next(v for k, v in self.events if k == "start")


def _lively(build: Any, vocab: int) -> torch.nn.Module:
    """A tiny model with weights large enough that greedy output varies (the default init repeats one token)."""
    model, g = build(vocab), torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return model


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny_live(request, tok, tmp_path_factory) -> LiveModel:
    from lorablocks.serving.blocks import BlockLibrary

    model = _lively(tiny_llama if request.param == "llama" else tiny_gpt2, len(tok))
    return LiveModel(ComposedModel(model, tok), BlockLibrary(tmp_path_factory.mktemp("noblocks")))


@pytest.fixture(params=[1, 2], ids=["1 lane", "2 lanes"])
def scheduler(request, tiny_live):
    s = Scheduler(tiny_live, max_batch=4, queue=8, lanes=request.param)
    yield s
    s.shutdown()


def _alone(live: LiveModel, job: FakeJob) -> tuple[str, str, int]:
    return generate_text(live.composed.model, live.composed.tokenizer, job.ids, job.params)


def test_a_sequence_in_a_padded_batch_has_its_logits_alone(tiny_live, tok):
    model = tiny_live.composed.model
    seqs = [list(encode_prompt(tok, p, "raw")) for p in PROMPTS[:4]]
    assert len({len(s) for s in seqs}) > 2  # the batch really pads
    batch, alive = BatchCache(), [0, 1, 2, 3]
    with torch.no_grad():
        for ids in seqs:
            out = model(input_ids=torch.tensor([ids]), use_cache=True)
            assert BatchCache.batchable(cache_of(out))
            batch.join(cache_of(out), len(ids))
        for rows in ([0, 1, 2, 3], [0, 2, 3], [2]):  # leave: rows go, the all-padding columns are trimmed
            batch.keep([alive.index(r) for r in rows])
            alive = rows
            nxt = [7 + len(seqs[r]) % 5 for r in alive]
            mask, positions = batch.step_inputs()
            logits = model(input_ids=torch.tensor([[t] for t in nxt]), attention_mask=mask, position_ids=positions,
                           cache=batch.cache, use_cache=True).logits[:, -1]
            for i, r in enumerate(alive):
                seqs[r].append(nxt[i])
                ref = model(input_ids=torch.tensor([seqs[r]])).logits[0, -1]
                torch.testing.assert_close(logits[i], ref, atol=1e-5, rtol=1e-5)
            if len(alive) > 1:
                assert not torch.allclose(logits[0], logits[1])  # the rows are different sequences
            assert batch.mask.shape[1] == max(len(seqs[r]) for r in alive)  # no column that is padding only


def test_the_batch_cache_appends_in_place_and_holds_what_concatenation_would():
    from transformers.cache_utils import DynamicCache

    g = torch.Generator().manual_seed(0)
    rand = lambda b, t: torch.randn(b, 2, t, 4, generator=g)  # noqa: E731 - [batch, heads, tokens, dim]
    cache = DynamicCache()
    keys, values = rand(1, 5), rand(1, 5)
    cache.update(keys, values, 0)
    batch = BatchCache()
    batch.join(cache, 5)
    layer = batch.cache.layers[0]
    pointers = set()
    for _ in range(20):  # 5 + 20 tokens fit the first room (5 + 1 + 64): no copy of the old tokens
        batch.step_inputs()
        k, v = rand(1, 1), rand(1, 1)
        out_k, out_v = layer.update(k, v)
        keys, values = torch.cat([keys, k], dim=-2), torch.cat([values, v], dim=-2)
        assert torch.equal(out_k, keys) and torch.equal(out_v, values)
        pointers.add(layer.keys.data_ptr())
    assert len(pointers) == 1
    other = DynamicCache()
    other_keys, other_values = rand(1, 3), rand(1, 3)
    other.update(other_keys, other_values, 0)
    batch.join(other, 3)  # the batch's tensors are replaced (left-padded, concatenated): adopted at the next update
    batch.step_inputs()
    k2, v2 = rand(2, 1), rand(2, 1)
    out_k, _ = batch.cache.layers[0].update(k2, v2)
    padded = torch.nn.functional.pad(other_keys, (0, 0, keys.shape[-2] - 3, 0))
    assert torch.equal(out_k, torch.cat([torch.cat([keys, padded]), k2], dim=-2))
    batch.keep([1])  # leaving trims the columns that are padding in every row left; still exact after
    batch.step_inputs()
    k3, v3 = rand(1, 1), rand(1, 1)
    out_k, out_v = batch.cache.layers[0].update(k3, v3)
    assert torch.equal(out_k, torch.cat([other_keys, k2[1:], k3], dim=-2))
    assert torch.equal(out_v, torch.cat([other_values, v2[1:], v3], dim=-2))


def test_a_sliding_window_layer_stays_sliding_in_the_batch_cache(tok):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                           max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=0,
                           layer_types=["sliding_attention", "full_attention"])
    model = Gemma3ForCausalLM(cfg).eval()
    ids = tok("the quick brown fox jumps over the lazy dog")["input_ids"]
    with torch.no_grad():
        cache = cache_of(model(input_ids=torch.tensor([ids]), use_cache=True))
        sliding = type(cache.layers[0])
        assert sliding.is_sliding and not BatchCache.batchable(cache)
        batch = BatchCache()
        batch.join(cache, len(ids))  # one sequence alone (a lane that cannot batch): still its own cache
        assert type(batch.cache.layers[0]) is sliding and type(batch.cache.layers[1]).__name__ == "_GrowingLayer"
        for _ in range(6):
            mask, positions = batch.step_inputs()
            model(input_ids=torch.tensor([[5]]), attention_mask=mask, position_ids=positions, use_cache=True,
                  past_key_values=batch.cache)
    assert batch.cache.layers[0].keys.shape[-2] == cfg.sliding_window - 1  # the window, not the whole sequence
    assert batch.cache.layers[1].keys.shape[-2] == len(ids) + 6


def test_batched_outputs_equal_outputs_alone_greedy_seeded_stop(tiny_live, scheduler, tok):
    settings = [dict(max_new_tokens=20), dict(max_new_tokens=33), dict(max_new_tokens=7),
                dict(max_new_tokens=25, temperature=1.2, seed=3), dict(max_new_tokens=30, temperature=0.8, top_p=0.7,
                                                                      seed=5), dict(max_new_tokens=18)]
    jobs = [FakeJob(encode_prompt(tok, p, "raw"), SamplingParams(**kw)) for p, kw in zip(PROMPTS, settings)]
    with tiny_live.lock.write():  # the first four start in one batch
        for job in jobs[:4]:
            scheduler.start(job)
    jobs[0].started.wait(30)
    for job in jobs[4:]:  # the others join while it runs (the batch is full: they wait for a row to leave)
        scheduler.start(job)
    results = [job.result() for job in jobs]
    for job, result in zip(jobs, results):
        assert result == _alone(tiny_live, job)
    assert len({r[0] for r in results}) == len(jobs)  # the outputs differ: nothing passes by repeating one token
    # a stop string: cut where it appears, alone and batched alike
    text = results[1][0]
    stop = text[10:13]
    stopped = [FakeJob(jobs[1].ids, SamplingParams(max_new_tokens=33, stop=(stop,))), FakeJob(jobs[0].ids,
                                                                                               jobs[0].params)]
    for job in stopped:
        scheduler.start(job)
    assert stopped[0].result() == _alone(tiny_live, stopped[0]) and stopped[0].result()[1] == "stop"
    assert stopped[1].result() == results[0]


def test_a_change_applies_between_steps_and_cuts_the_running_requests(live, tok):
    scheduler = Scheduler(live, max_batch=4, queue=4)
    try:
        live.set_active([])
        ids = encode_prompt(live.composed.tokenizer, PROMPTS[2], "raw")
        long = [FakeJob(ids, SamplingParams(max_new_tokens=400)) for _ in range(2)]
        for job in long:
            scheduler.start(job)
        deadline = time.monotonic() + 30
        while len(long[1].chunks()) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        report = live.set_active([("math", 1.0)])
        for job in long:
            text, finish, tokens = job.result()
            assert finish == CUT_BY_CHANGE and 3 <= tokens < 400 and job.fingerprint() == "base"
            full = generate_text(live.composed.model, live.composed.tokenizer, ids, SamplingParams(max_new_tokens=400))
            assert full != (text, finish, tokens)
        live.set_active([])
        base = generate_text(live.composed.model, live.composed.tokenizer, ids, SamplingParams(max_new_tokens=400))
        assert base[0].startswith(long[0].result()[0]) and len(base[0]) > len(long[0].result()[0])
        live.set_active([("math", 1.0)])
        after = FakeJob(ids, SamplingParams(max_new_tokens=12))
        scheduler.start(after)
        assert after.result()[1] in ("stop", "length")
        assert after.fingerprint() == report.fingerprint != "base"
        assert after.result() == generate_text(live.composed.model, live.composed.tokenizer, ids,
                                               SamplingParams(max_new_tokens=12))
    finally:
        scheduler.shutdown()
        live.set_active([])


def test_a_cancelled_request_leaves_and_the_others_go_on(tiny_live, scheduler, tok):
    jobs = [FakeJob(encode_prompt(tok, p, "raw"), SamplingParams(max_new_tokens=60)) for p in PROMPTS[:3]]
    for job in jobs:
        scheduler.start(job)
    while len(jobs[1].chunks()) < 2:
        time.sleep(0.002)
    jobs[1].cancelled.set()
    assert jobs[1].result()[2] < 60
    for job in (jobs[0], jobs[2]):
        assert job.result() == _alone(tiny_live, job)
    deadline = time.monotonic() + 10
    while scheduler._admitted and time.monotonic() < deadline:
        time.sleep(0.005)
    assert scheduler._admitted == 0


def test_the_queue_is_bounded_and_a_failing_request_fails_alone(tiny_live, tok):
    scheduler = Scheduler(tiny_live, max_batch=1, queue=1)
    try:
        ok = FakeJob(encode_prompt(tok, PROMPTS[0], "raw"), SamplingParams(max_new_tokens=8))
        bad = FakeJob([10 ** 6], SamplingParams(max_new_tokens=8))  # not a token of this model: its prefill fails
        with tiny_live.lock.write():
            scheduler.start(bad)
            scheduler.start(ok)
            with pytest.raises(ServerBusyError, match="busy"):
                scheduler.start(FakeJob(ok.ids, ok.params))
        assert ok.result() == _alone(tiny_live, ok)
        assert bad.ended.wait(30) and [k for k, _ in bad.events] == ["error", "end"]
    finally:
        scheduler.shutdown()
    with pytest.raises(ServerBusyError, match="stopping"):
        scheduler.start(FakeJob(ok.ids, ok.params))


def test_shutdown_ends_running_and_waiting_requests(tiny_live, tok):
    scheduler = Scheduler(tiny_live, max_batch=1, queue=2)
    jobs = [FakeJob(encode_prompt(tok, PROMPTS[0], "raw"), SamplingParams(max_new_tokens=500)) for _ in range(2)]
    for job in jobs:
        scheduler.start(job)
    jobs[0].started.wait(30)
    scheduler.shutdown()
    assert jobs[0].result()[1] == "length" and jobs[0].result()[2] < 500
    assert jobs[1].ended.wait(30) and [k for k, _ in jobs[1].events] == ["end"]  # never started


def test_the_batching_server_answers_503_with_retry_after_when_full(live):
    server, scheduler = start_server(live, max_batch=1, queue=0, max_tokens_limit=8)
    body = {"model": "tiny", "prompt": "x", "max_tokens": 3, "temperature": 0}
    first: list[httpx.Response] = []
    try:
        with live.lock.write():
            t = threading.Thread(target=lambda: first.append(httpx.post(server.url + "/v1/completions", json=body,
                                                                        timeout=30)))
            t.start()
            deadline = time.monotonic() + 20
            while scheduler._admitted < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
            assert r.status_code == 503 and r.headers["Retry-After"] and "busy" in r.json()["error"]["message"]
        t.join(30)
        assert first[0].status_code == 200
    finally:
        server.stop()


class _FailingDecode:
    """A tokenizer whose ``decode`` fails on text holding token ``bad`` (every other call is the real one's)."""

    def __init__(self, tokenizer: Any, bad: int) -> None:
        self._tokenizer, self._bad = tokenizer, bad

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._tokenizer(*args, **kwargs)

    def decode(self, ids: Any, **kwargs: Any) -> str:
        if self._bad in list(ids):
            raise ValueError(f"token {self._bad} does not decode")
        return self._tokenizer.decode(ids, **kwargs)


def _greedy_tokens(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    ids, new = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            new.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            ids.append(new[-1])
    return new


def test_a_row_whose_text_fails_to_decode_fails_alone(tiny_live, tok, tmp_path):
    from lorablocks.serving.blocks import BlockLibrary

    model, params = tiny_live.composed.model, SamplingParams(max_new_tokens=20)
    a, b = encode_prompt(tok, PROMPTS[0], "raw"), encode_prompt(tok, PROMPTS[2], "raw")
    others = set(_greedy_tokens(model, b, 20))
    bad = next(t for t in _greedy_tokens(model, a, 20)[3:] if t not in others)  # a's text fails mid-answer, b's never
    live = LiveModel(ComposedModel(model, _FailingDecode(tok, bad)), BlockLibrary(tmp_path))
    scheduler = Scheduler(live, max_batch=4, queue=4)
    try:
        failing, fine = FakeJob(a, params), FakeJob(b, params)
        with live.lock.write():  # both in one batch
            scheduler.start(failing)
            scheduler.start(fine)
        assert failing.ended.wait(30) and [k for k, _ in failing.events][-2:] == ["error", "end"]
        assert fine.result() == _alone(tiny_live, fine)
        later = FakeJob(b, SamplingParams(max_new_tokens=5))  # the scheduler goes on
        scheduler.start(later)
        assert later.result() == _alone(tiny_live, later)
    finally:
        scheduler.shutdown()


def test_a_decoding_thread_that_fails_ends_every_request_and_refuses_new_ones(tiny_live, tok):
    scheduler = Scheduler(tiny_live, max_batch=1, queue=2)
    try:
        def broken(rows: list[int]) -> None:
            raise RuntimeError("a bug in the batch")

        scheduler._lanes[0].batch.keep = broken  # the first row that leaves breaks the thread
        ids = encode_prompt(tok, PROMPTS[0], "raw")
        first, waiting = FakeJob(ids, SamplingParams(max_new_tokens=4)), FakeJob(ids, SamplingParams(max_new_tokens=4))
        with tiny_live.lock.write():
            scheduler.start(first)
            scheduler.start(waiting)
        assert first.ended.wait(30) and waiting.ended.wait(30)  # nobody hangs
        assert [k for k, _ in waiting.events] == ["error", "end"] and "a bug" in str(waiting.events[0][1])
        with pytest.raises(RuntimeError, match="internal error: RuntimeError: a bug in the batch"):
            scheduler.start(FakeJob(ids, SamplingParams(max_new_tokens=4)))
        assert scheduler._admitted == 0
    finally:
        scheduler.shutdown()


def test_a_whole_answer_whose_client_goes_away_leaves_the_batch(tiny_live):
    server, scheduler = start_server(tiny_live, max_batch=2, queue=2, max_tokens_limit=400)
    scheduler._eos.clear()  # no early EOS: the answer runs to its 400 tokens unless it is cancelled
    slow = tiny_live.composed.model.register_forward_hook(lambda *args: time.sleep(0.01))  # >= 4 s for 400 tokens
    try:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 400, "temperature": 0}
        with pytest.raises(httpx.TimeoutException):
            httpx.post(server.url + "/v1/completions", json=body, timeout=0.3)  # the client gives up
        deadline = time.monotonic() + 2
        while scheduler._admitted and time.monotonic() < deadline:
            time.sleep(0.02)
        assert scheduler._admitted == 0  # its row left: it did not decode the 400 tokens for nobody
    finally:
        slow.remove()
        server.stop()


def test_health_reports_a_failed_scheduler(tiny_live):
    server, scheduler = start_server(tiny_live, max_batch=2, queue=2)
    try:
        assert httpx.get(server.url + "/health").status_code == 200

        def broken(rows: list[int]) -> None:
            raise RuntimeError("a bug in the batch")

        scheduler._lanes[0].batch.keep = broken
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": 0}
        httpx.post(server.url + "/v1/completions", json=body, timeout=30)  # its row leaving breaks the thread
        deadline = time.monotonic() + 10
        while scheduler.failure is None and time.monotonic() < deadline:
            time.sleep(0.02)
        health = httpx.get(server.url + "/health")
        assert health.status_code == 500 and health.json()["status"] == "failed"
        assert "a bug in the batch" in health.json()["error"]
    finally:
        server.stop()
