"""The second built-in model against the default, side by side: Gemma 3 270M vs SmolLM2-135M.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_models.py [--data ../shared/data/math] [--repeats 2]

Both models are loaded in this one process (``load_model``, offline, from their prepared cache folders) and
measured interleaved (A B A B ...), so a busy machine slows both alike; only the ratios mean much.

1. **load**: ``load_model`` wall time (prepared folder -> model and tokenizer in eval mode).
2. **training step**: seconds per optimizer step of :func:`lorablocks.training.train.train_adapter` in the
   quick preset's shape (batch 8, max length 128, each model's target preset, precision ``auto``, no
   validation or statistics), ``--steps`` steps on the same first 64 training examples.
3. **evaluation**: :func:`lorablocks.passes.evaluate.evaluate_perplexity` of the base model on the first
   ``--limit`` test examples (max length 192, the quick preset's), its wall time and perplexity.

Best of ``--repeats`` for each timing. The quick study's time on Gemma is estimated as the default's
measured 19.0 min times the ratio of ``steps x step time + scored examples x time per example`` between
the models, with the quick preset's counts: 128 optimizer steps (4 blocks x 8, 6 merged-data pairs x 16)
and about 1,408 scored test examples (base and singles on all 4 domains, 11 sums and their 11 RegMean
versions and the 6 merged-data adapters on their own domains, 16 examples each).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from lorablocks.model.models import load_model
from lorablocks.passes.evaluate import evaluate_perplexity, prepare_eval_set
from lorablocks.training.data import resolve_domains
from lorablocks.training.train import TrainConfig, train_adapter

MODELS = ("smollm2-135m", "gemma3-270m")


def _train_seconds(model, tok, data: str, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(data=[data], out=str(Path(tmp) / "a"), train_limit=64, batch_size=8, max_length=128,
                          max_steps=steps, warmup_steps=0, val_limit=0, checkpoint_every=0, statistics=False)
        res = train_adapter(cfg, model=model, tokenizer=tok, progress=False)
    return res.record["train_seconds"] / steps


def _eval(model, tok, data: str, limit: int) -> tuple[float, float]:
    es = prepare_eval_set(tok, resolve_domains([data]), split="test", limit=limit, max_length=192)
    t0 = time.perf_counter()
    res = evaluate_perplexity(model, es, precision="auto")
    return time.perf_counter() - t0, res.domains[Path(data).name].perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "math"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--quick-minutes", type=float, default=19.0, help="the default model's measured quick preset")
    ap.add_argument("--quick-steps", type=int, default=128, help="optimizer steps of the quick preset")
    ap.add_argument("--quick-examples", type=int, default=1408, help="scored test examples of the quick preset")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    loaded, load_s = {}, {}
    for name in MODELS:
        t0 = time.perf_counter()
        loaded[name] = load_model(name)
        load_s[name] = time.perf_counter() - t0
    step = {n: float("inf") for n in MODELS}
    ev = {n: float("inf") for n in MODELS}
    ppl = {}
    for rep in range(args.repeats):
        for name in MODELS:
            model, tok = loaded[name]
            one_step = _train_seconds(model, tok, args.data, args.steps)
            seconds, ppl[name] = _eval(model, tok, args.data, args.limit)
            step[name], ev[name] = min(step[name], one_step), min(ev[name], seconds)
            print(f"  repeat {rep + 1} {name}: step {one_step:.2f} s, eval {seconds:.1f} s, ppl {ppl[name]:.4f}", flush=True)
    a, b = MODELS
    print(f"{'':28}{a:>16}{b:>16}{'ratio':>10}")
    for label, d in (("load (s)", load_s), ("training step (s)", step), (f"eval {args.limit} examples (s)", ev)):
        print(f"{label:28}{d[a]:>16.2f}{d[b]:>16.2f}{d[b] / d[a]:>9.2f}x")
    print(f"{'math test perplexity':28}{ppl[a]:>16.4f}{ppl[b]:>16.4f}")
    cost = {n: args.quick_steps * step[n] + args.quick_examples / args.limit * ev[n] for n in MODELS}
    r = cost[b] / cost[a]
    share = args.quick_steps * step[a] / cost[a]
    print(f"quick preset on {b}: about {args.quick_minutes * r:.0f} min ({args.quick_minutes} min x {r:.2f}; "
          f"training {share:.0%} of the default's modelled time)")


if __name__ == "__main__":
    main()
