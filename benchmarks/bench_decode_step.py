"""What one batched decoding step costs on this CPU, and why batching 8 rows is not 8x (issue 16).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_decode_step.py [--threads 1] [--rows 1,8,16]

1. **GEMMs alone**: every linear module of the default model (SmolLM2-135M) once, in the model's order, on
   ``rows`` random input rows, as one decoding step runs them (540 MB of float32 weights, more than any cache
   holds, so they stream from memory as in a real step), with float32 weights and with bfloat16 ones (``serve
   --dtype bfloat16``): ms per step and the weight bytes streamed per second.
2. **The whole step** on a batch of ``rows`` sequences of about 200 tokens (the scheduler's ``BatchCache``), with
   the KV cache appended into spare room (the scheduler's layer) vs concatenated at every step (transformers'
   ``DynamicLayer``), alternated ``--repeats`` times in this process: ms per step.
3. **What bfloat16 weights change**: the next-token distributions of the bf16 model against the float32 one,
   teacher-forced along each float32 greedy answer (128 tokens) to a few prompts: top-1 agreement and mean KL.
4. **One sequence alone**, without HTTP: 128 greedy tokens by ``generate_stream`` (the thread-per-request path)
   and through the scheduler, alternated ``--repeats`` times, float32 and bfloat16: tokens/s.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


PROMPTS = ("Write a long, detailed essay about the history of the Roman Empire.",
           "Explain in detail how a car engine works, step by step.",
           "What is the derivative of x^3 + 2x?", "List the symptoms of dehydration.")


def gemm_step_ms(model: torch.nn.Module, rows: int, repeats: int = 10) -> float:
    """ms for one pass of ``rows`` rows through every linear module (and the head) of ``model``."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    dtype = linears[0].weight.dtype
    inputs = {m.in_features: torch.randn(rows, m.in_features, dtype=dtype) for m in linears}

    def once() -> None:
        for m in linears:
            torch.nn.functional.linear(inputs[m.in_features], m.weight)

    once()
    t0 = time.perf_counter()
    for _ in range(repeats):
        once()
    return 1e3 * (time.perf_counter() - t0) / repeats


def model_step_ms(composed: object, rows: int, growing: bool, steps: int = 40) -> float:
    """ms per decoding step of ``rows`` sequences (about 200 tokens each) through the scheduler's batch cache."""
    from lorablocks.serving import scheduler
    from lorablocks.serving.generation import cache_argument, cache_of

    model = composed.model
    arg, extra = cache_argument(model)
    keep = scheduler._GrowingLayer.__dict__["of"]
    if not growing:
        scheduler._GrowingLayer.of = staticmethod(lambda layer: layer)  # type: ignore[method-assign]
    try:
        batch, g = scheduler.BatchCache(), torch.Generator().manual_seed(0)
        with torch.no_grad():
            for b in range(rows):
                ids = torch.randint(0, 1000, (1, 200 - 3 * b), generator=g)
                batch.join(cache_of(model(input_ids=ids, use_cache=True, **{arg: None}, **extra)), ids.shape[1])

            def step() -> None:
                mask, positions = batch.step_inputs()
                tokens = torch.randint(0, 1000, (rows, 1), generator=g)
                model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                      **{arg: batch.cache}, **extra)

            step()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            return 1e3 * (time.perf_counter() - t0) / steps
    finally:
        scheduler._GrowingLayer.of = keep  # type: ignore[method-assign]


@torch.no_grad()
def bf16_agreement(composed: object, bf16: torch.nn.Module, tokens: int = 128) -> tuple[float, float, int]:
    """(top-1 agreement, mean KL(fp32 || bf16) in nats, positions) along each fp32 greedy answer to PROMPTS."""
    from lorablocks.serving.generation import encode_chat

    agree = kl = n = 0.0
    for prompt in PROMPTS:
        ids = encode_chat(composed.tokenizer, [{"role": "user", "content": prompt}])
        answer = composed.model.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False)
        ref = torch.log_softmax(composed.model(answer).logits[0, len(ids) - 1:-1].double(), -1)
        low = torch.log_softmax(bf16(answer).logits[0, len(ids) - 1:-1].double(), -1)
        agree += float((ref.argmax(-1) == low.argmax(-1)).sum())
        kl += float((ref.exp() * (ref - low)).sum())
        n += ref.shape[0]
    return agree / n, kl / n, int(n)


class _Job:
    """A scheduler job that only waits for its end."""

    def __init__(self, ids: list[int], params: object) -> None:
        import threading

        self.ids, self.params, self.composition = ids, params, None
        self.cancelled, self.done = threading.Event(), threading.Event()

    def put(self, kind: str, value: object = None) -> None:
        if kind == "end":
            self.done.set()


def one_sequence(composed: object, repeats: int, tokens: int = 128) -> list[tuple[float, float]]:
    """(tokens/s alone, tokens/s through the scheduler) for one greedy answer, ``repeats`` times alternated."""
    from lorablocks.serving.blocks import BlockLibrary
    from lorablocks.serving.generation import SamplingParams, encode_chat, generate_stream
    from lorablocks.serving.live import LiveModel
    from lorablocks.serving.scheduler import Scheduler

    ids = encode_chat(composed.tokenizer, [{"role": "user", "content": PROMPTS[0]}])
    params = SamplingParams(max_new_tokens=tokens, temperature=0.0)
    empty = tempfile.mkdtemp()  # the library is not used: no blocks are active
    scheduler = Scheduler(LiveModel(composed, BlockLibrary(empty)), max_batch=16)

    def alone() -> float:
        t0 = time.perf_counter()
        for _ in generate_stream(composed.model, composed.tokenizer, ids, params):
            pass
        return tokens / (time.perf_counter() - t0)

    def batched() -> float:
        job, t0 = _Job(ids, params), time.perf_counter()
        scheduler.start(job)
        job.done.wait()
        return tokens / (time.perf_counter() - t0)

    try:
        alone(), batched()  # warm up
        return [(alone(), batched()) for _ in range(repeats)]
    finally:
        scheduler.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", default="1,8,16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lorablocks.model.session import ComposedModel

    composed = ComposedModel.load("smollm2-135m")
    composed.model.eval()
    rows = [int(r) for r in args.rows.split(",")]
    weight_bytes = sum(m.weight.numel() * 4 for m in composed.model.modules() if isinstance(m, torch.nn.Linear))
    print(f"torch threads {args.threads}; {weight_bytes / 1e6:.0f} MB of linear weights per step")
    import copy

    bf16 = copy.deepcopy(composed.model).to(torch.bfloat16)
    print("1. GEMMs of one step (every linear module once)")
    for name, model, size in (("float32", composed.model, weight_bytes), ("bfloat16", bf16, weight_bytes / 2)):
        base = None
        for r in rows:
            ms = min(gemm_step_ms(model, r) for _ in range(args.repeats))
            base = base or ms
            print(f"   {name:8s} {r:3d} rows: {ms:6.1f} ms ({ms / base:.2f}x one row), weights at "
                  f"{size / ms / 1e6:.1f} GB/s")
    print("2. whole decoding step, KV cache appended in place vs concatenated (alternated)")
    for r in rows:
        pairs = [(model_step_ms(composed, r, True), model_step_ms(composed, r, False)) for _ in range(args.repeats)]
        text = ", ".join(f"{a:.1f} vs {b:.1f}" for a, b in pairs)
        print(f"   {r:3d} rows: in place vs concatenated, ms per step: {text}")
    agree, kl, n = bf16_agreement(composed, bf16)
    print(f"3. bfloat16 vs float32 weights, next token along {n} positions of float32 greedy answers: top-1 agreement "
          f"{100 * agree:.1f} %, mean KL {kl:.2e} nats")
    print("4. one greedy answer of 128 tokens alone (no HTTP): generate_stream vs the scheduler, tokens/s")
    for name, model in (("float32", composed.model), ("bfloat16", bf16)):
        pairs = one_sequence(ComposedModel(model, composed.tokenizer, composed.model_id), args.repeats)
        print(f"   {name:8s} " + ", ".join(f"{a:.1f} vs {b:.1f}" for a, b in pairs))


if __name__ == "__main__":
    main()
