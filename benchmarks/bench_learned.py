#!/usr/bin/env python
"""The ``learned`` floor of issue 9, on the default model with a study's trained adapters.

For each pair of domains (default: every pair whose merged-data adapter the study trained), side by side in
one run on the same held-out test examples:

* the naive sum of the two single adapters;
* ``learned``: one weight per block and per layer, fitted on the first ``--fit-limit`` validation examples of
  each domain (a quarter held out for early stopping), model frozen, started at weights 1;
* the merged-data adapter.

It prints each one's joint perplexity, learned vs the sum (with a paired-bootstrap interval), and the share
of the sum's gap to the merged-data adapter that learned closes. The floors: learned below the sum on every
pair; at least half the gap closed on at least one.

    .venv/bin/python benchmarks/bench_learned.py --adapters study-out/adapters --data ../shared/data
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> int:
    import torch

    from lorablocks.compose import Block, make_recipe
    from lorablocks.files.adapters import load_adapter
    from lorablocks.model.session import ComposedModel
    from lorablocks.study.stats import paired_change
    from lorablocks.training.data import resolve_domains
    from lorablocks.passes.evaluate import evaluate_perplexity, prepare_eval_set
    from lorablocks.training.learned import LearnSettings, fit_layer_weights

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=Path, required=True, help="a study's OUT/adapters folder")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--pairs", nargs="*", default=None, help="e.g. math+medicine (default: every merged-a+b found)")
    p.add_argument("--limit", type=int, default=50, help="test examples per domain")
    p.add_argument("--fit-limit", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    pairs = a.pairs or sorted(d.name.removeprefix("merged-") for d in a.adapters.glob("merged-*+*") if d.name.count("+") == 1)
    session = ComposedModel.load("smollm2-135m")
    ok_below, ok_half = True, False
    print(f"{'pair':24} {'PPL sum':>9} {'PPL learned':>12} {'PPL merged':>11} {'learned vs sum':>26} {'gap closed':>11} {'fit s':>6}")
    for pair in pairs:
        names = pair.split("+")
        domains = resolve_domains([str(a.data / n) for n in names])
        deltas = [load_adapter(a.adapters / n).delta for n in names]
        merged = load_adapter(a.adapters / f"merged-{pair}").delta
        eval_set = prepare_eval_set(session.tokenizer, domains, limit=a.limit, max_length=192)
        template = make_recipe([Block(name=n) for n in names], method="learned")
        t0 = time.perf_counter()
        fit = fit_layer_weights(session.model, session.tokenizer, template, deltas, domains,
                                LearnSettings(steps=a.steps, limit=a.fit_limit))
        fit_s = time.perf_counter() - t0
        results = {}
        for label, recipe, srcs in (("sum", make_recipe([Block(name=n) for n in names]), deltas),
                                    ("learned", fit.recipe, deltas),
                                    ("merged", make_recipe([Block(name="merged")]), [merged])):
            session.apply_recipe(recipe, srcs)
            results[label] = evaluate_perplexity(session.model, eval_set, precision="auto")
            session.clear()
        rows = {k: [r.per_example[d.name][: min(len(v) for v in r.per_example.values())] for d in domains]
                for k, r in results.items()}
        iv = paired_change(rows["learned"], rows["sum"])
        s, l, m = (results[k].joint.perplexity for k in ("sum", "learned", "merged"))
        closed = (s - l) / (s - m) if s > m else float("nan")
        ok_below &= l < s
        ok_half |= closed >= 0.5
        print(f"{pair:24} {s:9.3f} {l:12.3f} {m:11.3f} {iv.format_pct():>26} {closed:11.2f} {fit_s:6.0f}"
              f"{'' if fit.improved else '  (start kept)'}", flush=True)
    print(f"floor: learned below the naive sum on every pair: {'PASS' if ok_below else 'FAIL'}; "
          f"at least half the gap to merged-data closed on one pair: {'PASS' if ok_half else 'FAIL'}")
    return 0 if ok_below and ok_half else 1


if __name__ == "__main__":
    raise SystemExit(main())
