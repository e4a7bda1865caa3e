"""The server on the real default model (SmolLM2-135M-Instruct, its chat template): the ``openai`` client's
completions and streamed chat, a block changes the greedy answer, removing it restores the base exactly."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import openai
import pytest
import torch

from tests.serving.conftest import start_server

pytestmark = pytest.mark.slow

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")


def write_random_block(model: torch.nn.Module, out: Path, seed: int, rank: int = 4, rel: float = 0.1) -> Path:
    """A rank-``rank`` block on the paper's targets with random non-zero factors, ``|dW| ~ rel * |W|``."""
    from lorablocks.core.algebra import LowRank
    from lorablocks.files.writer import save_adapter

    g, delta = torch.Generator().manual_seed(seed), {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in TARGETS and isinstance(module, torch.nn.Linear):
            o, i = module.weight.shape
            a = torch.randn(rank, i, generator=g) / math.sqrt(i)
            b = torch.randn(o, rank, generator=g) * float(module.weight.detach().norm()) * rel / math.sqrt(o * rank)
            delta[name] = LowRank(B=b, A=a)
    return save_adapter(delta, out, base_model="smollm2-135m")


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_default_model_block_changes_greedy_output_and_removal_restores_it(tmp_path):
    from lorablocks.model.session import ComposedModel
    from lorablocks.serving.blocks import BlockLibrary
    from lorablocks.serving.live import LiveModel

    composed = ComposedModel.load("smollm2-135m")
    write_random_block(composed.model, tmp_path / "blocks" / "science", seed=1)
    pristine = _digest(composed.model)
    live = LiveModel(composed, BlockLibrary(tmp_path / "blocks"))
    server, _ = start_server(live)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "Tell me a short story about a cat."}]

        def answer() -> tuple[str, str]:
            r = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=20, temperature=0)
            return r.choices[0].message.content, r.system_fingerprint

        base, fp = answer()
        assert fp == "base" and base.strip()
        stream = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=20,
                                                temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == base
        done = client.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=4,
                                         temperature=0)
        assert done.choices[0].text.strip()

        added = client.post("/blocks/science", body={"weight": 1.0}, cast_to=object)
        with_block, fp1 = answer()
        assert fp1 == added["fingerprint"] != "base" and with_block != base
        client.delete("/blocks/science", cast_to=object)
        assert answer() == (base, "base")
        assert _digest(composed.model) == pristine
    finally:
        server.stop()


def test_default_model_batched_greedy_answers_equal_answers_alone(tmp_path):
    """Continuous batching on the real model: four chats of different lengths decoded together (left-padded,
    joining at different steps) give the greedy tokens each gives alone."""
    from lorablocks.model.session import ComposedModel
    from lorablocks.serving.blocks import BlockLibrary
    from lorablocks.serving.generation import SamplingParams, encode_chat, generate_text
    from lorablocks.serving.live import LiveModel
    from lorablocks.serving.scheduler import Scheduler
    from tests.serving.test_scheduler import FakeJob

    composed = ComposedModel.load("smollm2-135m")
    (tmp_path / "blocks").mkdir()
    live = LiveModel(composed, BlockLibrary(tmp_path / "blocks"))
    questions = ["Tell me a short story about a cat.", "What is the capital of France? Explain why.",
                 "Hi", "List three colours and one thing of each colour, please, in a sentence each."]
    jobs = [FakeJob(encode_chat(composed.tokenizer, [{"role": "user", "content": q}]),
                    SamplingParams(max_new_tokens=24)) for q in questions]
    assert len({len(j.ids) for j in jobs}) == len(jobs)
    scheduler = Scheduler(live, max_batch=4, queue=4)
    try:
        with live.lock.write():
            for job in jobs[:2]:
                scheduler.start(job)
        jobs[0].started.wait(60)
        for job in jobs[2:]:
            scheduler.start(job)
        for job in jobs:
            assert job.result() == generate_text(composed.model, composed.tokenizer, job.ids, job.params)
    finally:
        scheduler.shutdown()
