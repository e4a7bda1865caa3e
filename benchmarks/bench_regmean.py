#!/usr/bin/env python
"""regmean benchmarks (issue 17): the Gram sketch's error on real SmolLM2 inputs, and combine's cost.

1. **sketch** (``--parts sketch``): the base model's input Grams of ``mlp.down_proj`` (1536 wide, the widest
   SmolLM2-135M input) on ``--examples`` validation examples of two domains, at a few layers. For each sketch
   rank ``k`` (top-``k`` eigenpairs + the exact diagonal, what lorablocks stores for inputs wider than
   ``DENSE_MAX``): the Gram's relative Frobenius error, and the relative error of the regmean delta of two
   random rank-8 blocks (one per domain) made from the sketches instead of the exact Grams, measured on the
   domains' inputs (``sqrt(tr(E G E^T) / tr(D G D^T))`` with ``E`` the error, ``D`` the exact result, ``G`` the
   two domains' mean Gram) and in Frobenius norm.
2. **combine** (``--parts combine``): ``lorablocks combine A B ... --method regmean`` with stored statistics vs
   the plain sum, whole process (console entry point, start-up included), alternated ``--repeat`` times in
   one run; the median ratio (floor <= 3x).
3. **floors** (``--parts floors --study study-out``): the issue's quality floors from a quick-preset study's
   evaluation records (joint perplexity per pair, gap closed, own-domain degradation of the 4-block sum,
   unlearning by recomposing without a block).

    .venv/bin/python benchmarks/bench_regmean.py --parts sketch --data ../shared/data
    .venv/bin/python benchmarks/bench_regmean.py --parts combine --adapters study-out/adapters/{math,medicine,biomed,finance}
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def real_grams(data: Path, domains: list[str], examples: int, layers: list[int]) -> dict[str, list]:
    """Exact token-mean Grams of each layer's down_proj input, per domain (the base model's inputs)."""
    from lorablocks.model.session import ComposedModel
    from lorablocks.passes.statistics import collect_grams
    from lorablocks.training.data import resolve_domains, tokenize_examples

    session = ComposedModel.load("smollm2-135m")
    modules = [f"model.layers.{layer}.mlp.down_proj" for layer in layers]
    out: dict[str, list] = {m: [] for m in modules}
    for domain in resolve_domains([str(data / d) for d in domains]):
        exs = tokenize_examples(session.tokenizer, domain.load("validation", examples), 256).examples
        got = collect_grams(session.model, modules, exs, session.tokenizer.eos_token_id, dense_max=10**6)
        for m in modules:
            out[m].append(got.grams[m])
        print(f"  {domain.name}: {got.tokens} tokens", flush=True)
    return out


def sketch_part(a: argparse.Namespace) -> None:
    import torch

    from lorablocks.core.algebra import LowRank, to_dense
    from lorablocks.core.regmean import regmean, sketch

    print(f"sketch: down_proj input Grams of layers {a.layers}, {a.examples} validation examples of {a.domains}")
    grams = real_grams(a.data, a.domains, a.examples, a.layers)
    g = torch.Generator().manual_seed(0)
    for module, exact in grams.items():
        width = exact[0].size
        if a.adapters:  # the trained blocks' own factors (one per domain, in order)
            from lorablocks.files.adapters import open_adapter

            parts = [(1.0, open_adapter(p).factors(module, torch.float64)) for p in a.adapters[:len(exact)]]
        else:
            parts = [(1.0, LowRank(B=torch.randn(576, 8, generator=g, dtype=torch.float64) * 0.01,
                                   A=torch.randn(8, width, generator=g, dtype=torch.float64) * 0.01)) for _ in exact]
        ref = to_dense(regmean(parts, exact, 0.9), torch.float64)
        G = sum(e.dense() for e in exact) / len(exact)
        on_inputs = float(torch.trace(ref @ G @ ref.T)) ** 0.5
        M = sum(to_dense(x, torch.float64) for _, x in parts) / len(parts) - ref  # the plain mean's distance
        print(f"  {module}: the plain mean of the deltas is {float(torch.trace(M @ G @ M.T)) ** 0.5 / on_inputs:.4f} "
              f"from exact regmean on the inputs ({'trained' if a.adapters else 'random rank-8'} blocks)")
        for k in a.ranks:
            sk = [sketch(e.dense(), k, e.tokens) for e in exact]
            got = to_dense(regmean(parts, sk, 0.9), torch.float64)
            E = got - ref
            g_err = max(float((s.dense() - e.dense()).norm() / e.dense().norm()) for s, e in zip(sk, exact))
            in_err = float(torch.trace(E @ G @ E.T)).__abs__() ** 0.5 / on_inputs
            print(f"  {module} (in {width}) k={k:4d}: Gram rel. error {g_err:.4f}, regmean delta rel. error "
                  f"on the inputs {in_err:.4f}, Frobenius {float(E.norm() / ref.norm()):.4f}", flush=True)


def combine_part(a: argparse.Namespace) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    exe = [sys.executable, "-c", "import sys; sys.argv=['lorablocks']+sys.argv[1:]; from lorablocks.cli import main; main()"]
    root = Path(tempfile.mkdtemp(prefix="bench-regmean-"))
    times: dict[str, list[float]] = {"sum": [], "regmean": []}
    try:
        for rep in range(a.repeat):
            for method in ("sum", "regmean"):
                out = root / f"{method}-{rep}"
                t0 = time.perf_counter()
                proc = subprocess.run([*exe, "combine", *map(str, a.adapters), "--method", method, "--out", str(out)],
                                      env=env, capture_output=True, text=True)
                times[method].append(time.perf_counter() - t0)
                if proc.returncode != 0:
                    raise SystemExit(f"combine --method {method} failed: {proc.stderr.strip().splitlines()[-1:]}")
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    ratio = med["regmean"] / med["sum"]
    print(f"combine of {len(a.adapters)} blocks, whole process, median of {a.repeat}: sum {med['sum']:.2f} s, "
          f"regmean (stored statistics) {med['regmean']:.2f} s -> {ratio:.2f}x (floor <= 3x: "
          f"{'PASS' if ratio <= 3 else 'FAIL'})")


def _records(study: Path) -> dict[str, dict]:
    """The newest cached evaluation record of each label (with each example's NLL and tokens)."""
    import json

    out: dict[str, tuple[float, dict]] = {}
    for f in (study / "cache" / "evals").glob("*.json"):
        rec = json.loads(f.read_text())
        if rec["label"] not in out or f.stat().st_mtime > out[rec["label"]][0]:
            out[rec["label"]] = (f.stat().st_mtime, rec)
    return {k: v for k, (_, v) in out.items()}


def _oracle(recs: dict[str, dict], pair: tuple[str, ...]) -> float:
    """Joint perplexity of each single block scored on its own domain only (what a perfect router gets)."""
    from lorablocks.study.analysis import joint_perplexity

    return joint_perplexity({d: recs[f"single:{d}"]["per_example"][d] for d in pair}, pair)


def floors_part(a: argparse.Namespace) -> None:
    """The issue's quality floors from a finished (or partial) study folder."""
    import itertools
    import json

    from lorablocks.study.analysis import joint_perplexity

    recs = _records(a.study)
    rm = next((k.split(":")[0] for k in recs if k.startswith("regmean")), "regmean")  # e.g. regmean(alpha=0.9)
    results = json.loads((a.study / "results.json").read_text()) if (a.study / "results.json").is_file() else {}
    ivs = {tuple(m["domains"]): m.get("vs_merged") for m in results.get("methods", [])
           if str(m.get("method", "")).startswith("regmean")}
    domains = [d for d in ("math", "medicine", "biomed", "finance") if f"single:{d}" in recs]
    joint = lambda label, ds: joint_perplexity(recs[label]["per_example"], ds)  # noqa: E731
    within = closed = pairs = 0
    for pair in itertools.combinations(domains, 2):
        t = "+".join(pair)
        if not all(f"{k}:{t}" in recs for k in ("sum", rm, "merged")):
            continue
        s, r, m = joint(f"sum:{t}", pair), joint(f"{rm}:{t}", pair), joint(f"merged:{t}", pair)
        raw = (ivs.get(pair) or {}).get("joint")
        iv = {k: raw.get(k, raw.get(alt)) for k, alt in (("value", "estimate"), ("low", "lo"), ("high", "hi"),
                                                            ("p_adj", "p_adj"))} if raw else None
        ok = iv["low"] <= 0 if iv else r <= m  # the change's 95 % interval reaches zero or lies below it
        gap = (s - r) / (s - m) if s != m else float("nan")
        pairs, within, closed = pairs + 1, within + ok, closed + (gap >= 0.75)
        ivtext = (f", regmean vs merged {iv['value']:+.1f} % [{iv['low']:+.1f}, {iv['high']:+.1f}] (Holm p "
                  f"{iv['p_adj']})" if iv else "")
        oracle = _oracle(recs, pair)
        ivtext += f"; each single on its own domain (an oracle router) {oracle:.3f}"
        print(f"  {t}: joint perplexity sum {s:.3f}, regmean {r:.3f}, merged-data {m:.3f}{ivtext}; "
              f"gap closed {100 * gap:.0f} %; within or better: {ok}")
    print(f"floor: within merged-data's interval or better on {within} of {pairs} pairs (>= 5 of 6: "
          f"{'PASS' if within >= 5 and pairs == 6 else 'FAIL'}); >= 75 % of the gap closed on {closed} of {pairs} "
          f"({'PASS' if closed == pairs == 6 else 'FAIL'})")
    t = "+".join(domains)
    if f"sum:{t}" in recs and f"{rm}:{t}" in recs:
        own = lambda label, d: recs[label]["domains"][d]["perplexity"]  # noqa: E731
        ds = [own(f"sum:{t}", d) / own(f"single:{d}", d) - 1 for d in domains]
        dr = [own(f"{rm}:{t}", d) / own(f"single:{d}", d) - 1 for d in domains]
        for d, x, y in zip(domains, ds, dr):
            print(f"  {t} on {d}: vs its single block sum {100 * x:+.1f} %, regmean {100 * y:+.1f} %")
        removed = 1 - (sum(dr) / len(dr)) / (sum(ds) / len(ds))
        print(f"floor: regmean removes {100 * removed:.0f} % of the sum's mean own-domain degradation on the "
              f"{len(domains)}-block sum (>= 50 %: {'PASS' if removed >= 0.5 else 'FAIL'})")
    for d in domains:
        if f"unlearn-{rm}:{d}" in recs and f"unlearn:{d}" in recs:
            print(f"  unlearning {d}: the sum of all minus it {recs[f'unlearn:{d}']['domains'][d]['perplexity']:.3f}, "
                  f"regmean of the others {recs[f'unlearn-{rm}:{d}']['domains'][d]['perplexity']:.3f}, "
                  f"its single {recs[f'single:{d}']['domains'][d]['perplexity']:.3f}, "
                  f"base {recs['base']['domains'][d]['perplexity']:.3f} (on {d})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["sketch", "combine"], choices=["sketch", "combine", "floors"])
    p.add_argument("--study", type=Path, default=Path("study-out"), help="floors: a quick-preset study folder")
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--domains", nargs="+", default=["math", "medicine"])
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--layers", type=int, nargs="+", default=[0, 15, 29])
    p.add_argument("--ranks", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--adapters", type=Path, nargs="+", default=[],
                   help="combine: the blocks; sketch: blocks whose down_proj factors are used (one per domain)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    if "sketch" in a.parts:
        sketch_part(a)
    if "combine" in a.parts:
        if not a.adapters:
            raise SystemExit("--parts combine needs --adapters (folders with stored statistics)")
        combine_part(a)
    if "floors" in a.parts:
        floors_part(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
