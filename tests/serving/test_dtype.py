"""Serving from bfloat16 weights (``serve --dtype bfloat16``): each merge is computed in float32 from the
pristine bf16 weights and rounded once, removing every block gives the bf16 base back bit for bit, and
fingerprints name the dtype (the same recipe on float32 weights is other weights)."""

from __future__ import annotations

import httpx
import torch

from lorablocks.model.merge import target_weight
from lorablocks.model.session import ComposedModel
from lorablocks.serving.blocks import BlockLibrary
from lorablocks.serving.live import LiveModel
from tests.serving.conftest import start_server


def test_bfloat16_weights_merge_in_float32_round_once_and_are_fingerprinted(model_dir, blocks_dir):
    fp32 = LiveModel(ComposedModel.load(str(model_dir)), BlockLibrary(blocks_dir))
    bf16 = LiveModel(ComposedModel.load(str(model_dir), dtype=torch.bfloat16), BlockLibrary(blocks_dir))
    model = bf16.composed.model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert bf16.composed.identity == f"{fp32.composed.identity}@bfloat16"
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    active = [("math", 1.0), ("words", 0.5)]
    fp32.set_active(active)
    bf16.set_active(active)
    assert bf16.fingerprint != fp32.fingerprint
    params = dict(model.named_parameters())
    for name, x in bf16.composed.delta.items():
        weight, transposed = target_weight(model, name)
        pname = next(n for n, p in params.items() if p is weight)
        dw = (x.B.double() @ x.A.double()).T if transposed else x.B.double() @ x.A.double()
        exact = base[pname].double() + dw
        assert not torch.equal(weight, base[pname])  # the blocks change every module they touch
        # the exact sum rounded once to bf16, but for float32's own round-off at a tie (a merge in bf16
        # arithmetic, rounding W0 + dW in two steps, misses on a large share of the entries)
        assert (weight == exact.float().to(torch.bfloat16)).double().mean() > 0.995, name
        assert ((weight.double() - exact).abs() <= exact.abs() * 2.0 ** -7 + 1e-30).all(), name
    bf16.set_active([])
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())
    assert bf16.fingerprint == "base@bfloat16" and fp32.fingerprint != bf16.fingerprint  # no block: the base, named


def test_per_request_rows_in_bfloat16_get_their_own_fingerprint(model_dir, blocks_dir):
    from lorablocks.serving.unmerged import RequestCompositions, RowHooks

    for dtype, same in ((torch.float32, True), (torch.bfloat16, False)):
        live = LiveModel(ComposedModel.load(str(model_dir), dtype=dtype), BlockLibrary(blocks_dir))
        row = RequestCompositions(live, RowHooks(live.composed.model), limit=2).acquire("math")
        live.set_active([("math", 1.0)])
        assert (row.fingerprint == live.fingerprint) is same


def test_a_bfloat16_server_answers_with_its_own_fingerprint(model_dir, blocks_dir):
    live = LiveModel(ComposedModel.load(str(model_dir), dtype=torch.bfloat16), BlockLibrary(blocks_dir))
    live.set_active([("math", 1.0)])
    server, runner = start_server(live, max_tokens_limit=8, max_batch=4)
    try:
        body = {"prompt": "The quick brown fox", "max_tokens": 6, "temperature": 0}
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["system_fingerprint"] == live.fingerprint == r.headers["X-Lorablocks-Fingerprint"]
        assert r.json()["usage"]["completion_tokens"] > 0
    finally:
        server.stop()
        runner.shutdown()
