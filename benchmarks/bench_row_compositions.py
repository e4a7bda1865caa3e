"""What per-request compositions cost the batching scheduler, measured side by side in one run.

On the default model with three random rank-8 blocks (q/k/v/o/down projections), the scheduler decodes the same
jobs (greedy, ``--tokens`` new tokens each) with every row on the merged default, and with some rows naming their
own composition (served unmerged from the factors). Printed: aggregate tokens/s of each and their ratio, for one
client and for ``--clients`` at once, rounds interleaved.

    .venv/bin/python benchmarks/bench_row_compositions.py --threads 1
"""

from __future__ import annotations

import argparse
import math
import tempfile
import threading
import time
from pathlib import Path

import torch

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
PROMPTS = ["The capital of France is", "Question: What is 12 times 7?\nAnswer:", "Write a sentence about the sea:",
           "A patient with a fever should"]


class Job:
    def __init__(self, ids: list[int], params, composition=None) -> None:
        self.ids, self.params, self.composition = ids, params, composition
        self.cancelled, self.ended, self.tokens = threading.Event(), threading.Event(), 0

    def put(self, kind: str, value=None) -> None:
        if kind == "chunk":
            self.tokens = value.tokens or self.tokens
        if kind == "end":
            self.ended.set()


def _block(model: torch.nn.Module, out: Path, seed: int, rank: int = 8) -> None:
    from lorablocks.core.algebra import LowRank
    from lorablocks.files.writer import save_adapter

    g, delta = torch.Generator().manual_seed(seed), {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in TARGETS and isinstance(module, torch.nn.Linear):
            o, i = module.weight.shape
            a = torch.randn(rank, i, generator=g) / math.sqrt(i)
            b = torch.randn(o, rank, generator=g) * float(module.weight.detach().norm()) * 0.05 / math.sqrt(o * rank)
            delta[name] = LowRank(B=b, A=a)
    save_adapter(delta, out, base_model="smollm2-135m")


def _round(scheduler, tok, n: int, tokens: int, comps: list) -> float:
    """Aggregate tokens/s of ``n`` jobs started together; job ``i`` runs ``comps[i % len(comps)]``."""
    from lorablocks.serving.generation import SamplingParams, encode_prompt

    jobs = [Job(encode_prompt(tok, PROMPTS[i % len(PROMPTS)], "raw"),
                SamplingParams(max_new_tokens=tokens, temperature=0.0, stop=()), comps[i % len(comps)])
            for i in range(n)]
    t0 = time.perf_counter()
    with scheduler.live.lock.write():  # all join the first step together
        for job in jobs:
            scheduler.start(job)
    for job in jobs:
        job.ended.wait(600)
    return sum(j.tokens for j in jobs) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lorablocks.model.session import ComposedModel
    from lorablocks.serving.blocks import BlockLibrary
    from lorablocks.serving.live import LiveModel
    from lorablocks.serving.scheduler import Scheduler
    from lorablocks.serving.unmerged import RequestCompositions

    composed = ComposedModel.load("smollm2-135m")
    root = Path(tempfile.mkdtemp(prefix="lorablocks-rows-"))
    for i, name in enumerate(("math", "medicine", "finance")):
        _block(composed.model, root / name, seed=i + 1)
    live = LiveModel(composed, BlockLibrary(root))
    live.set_active([("math", 1.0), ("medicine", 1.0)])
    scheduler = Scheduler(live, max_batch=max(args.clients, 1), queue=0)
    tok = composed.tokenizer
    _round(scheduler, tok, args.clients, 8, [None])  # warm-up
    plain = max(_round(scheduler, tok, args.clients, args.tokens, [None]) for _ in range(args.rounds))
    comps = RequestCompositions(live, scheduler.row_hooks, limit=4)
    mixed = [None, comps.acquire("medicine+finance:0.5"), None, comps.acquire("finance")]
    for label, n in (("1 client", 1), (f"{args.clients} clients", args.clients)):
        merged, unmerged = [], []
        _round(scheduler, tok, n, 8, [None])  # warm-up
        for _ in range(args.rounds):
            merged.append(_round(scheduler, tok, n, args.tokens, [None]))
            unmerged.append(_round(scheduler, tok, n, args.tokens, mixed[1:2] if n == 1 else mixed))
        m, u = max(merged), max(unmerged)
        what = "its own composition" if n == 1 else "half the rows on 2 own compositions"
        print(f"{label}: all on the merged default {m:.1f} tok/s; {what} {u:.1f} tok/s; ratio {u / m:.2f}x "
              f"(best of {args.rounds}, {args.tokens} new tokens each)")
    hooked = max(_round(scheduler, tok, args.clients, args.tokens, [None]) for _ in range(args.rounds))
    print(f"{args.clients} clients, all on the default: before any per-request composition {plain:.1f} tok/s, "
          f"after some were served (hooks only live during their forwards) {hooked:.1f} tok/s; ratio {hooked / plain:.2f}x")
    scheduler.shutdown()


if __name__ == "__main__":
    main()
