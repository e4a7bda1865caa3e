#!/usr/bin/env python
"""Floors benchmark (issue 9): the composition methods beyond the sum vs PEFT, measured side by side in one run.

The fixture is ``bench_combine.py``'s: four random rank-16 LoRA adapters (lora_alpha 32) over one
TinyLlama-1.1B layer's seven projections, weights ``1, 0.8, -0.6, 1.2``, written as genuine PEFT folders and
loaded both by lorablocks and into one PEFT ``LlamaForCausalLM`` (model construction and adapter loading are
not timed against PEFT).

1. ``core``: lorablocks ``ties`` in core space (the default; ``--density``, rank ``minimal``) through
   ``compose()`` vs PEFT ``add_weighted_adapter(combination_type="ties_svd", svd_rank=64, density=...,
   svd_full_matrices=False)`` (PEFT's fastest SVD). Floors: >= 100x faster, rank <= 64. The two are different
   methods (TIES on the 64 x 64 cores vs TIES on the dense delta truncated to rank 64): their difference is
   printed for information only.
2. ``full``: lorablocks ``ties`` and ``magnitude_prune`` with ``space=full`` and a rank cap of 2048 (above
   every module's smaller dimension: nothing is truncated) vs PEFT ``ties_svd`` / ``magnitude_prune_svd`` with
   ``svd_rank=2048``. Floors: the deltas agree to a relative Frobenius error <= 1e-4 (overall and per module;
   PEFT's delta read back as ``scaling * B @ A`` of its new adapter, in float64) and lorablocks takes no
   longer (PEFT time / lorablocks time >= 1).

Timings are compared only as ratios inside one run (the machine is shared and noisy). Torch threads are set
with ``--threads`` (default 1). The fast side is the median of ``--fast-repeats`` after a warm-up; the slow
sides (PEFT, and lorablocks' full space) are the median of ``--slow-repeats`` (default 1), run alternately.

Exit status: 0 when every floor passes, 1 otherwise.

    .venv/bin/python benchmarks/bench_methods.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch / BLAS threads (default 1)")
    p.add_argument("--density", type=float, default=0.5, help="TIES / magnitude density (default 0.5)")
    p.add_argument("--fast-repeats", type=int, default=5, help="repeats of the core-space side (default 5)")
    p.add_argument("--slow-repeats", type=int, default=1, help="repeats of each slow side (default 1)")
    p.add_argument("--parts", default="1,2", help="comma-separated parts to run (default 1,2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.parts = {int(x) for x in args.parts.split(",") if x.strip()}
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # before torch is imported, so that its BLAS pools see it too
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_combine as fx  # noqa: E402  (the shared fixture: adapters, PEFT model, timing, table)
import torch  # noqa: E402

from lorablocks.compose import Block, Composition, compose, make_recipe  # noqa: E402
from lorablocks.core import algebra  # noqa: E402
from lorablocks.files.adapters import load_adapter  # noqa: E402

CORE_SVD_RANK = 64
FULL_RANK = 2048  # >= min(out, in) of every TinyLlama projection: PEFT and lorablocks both keep everything
FLOOR_CORE = 100.0
FLOOR_FULL_ERR = 1e-4
FLOOR_FULL_TIME = 1.0


def ours(deltas, method: str, rank: str | int, **params) -> Composition:
    """lorablocks: the recipe through ``compose()`` (what ``lorablocks combine --method`` runs per module)."""
    blocks = [Block(name=f"a{k}", weight=w) for k, w in enumerate(fx.WEIGHTS)]
    return compose(make_recipe(blocks, method=method, params=params, rank=rank), deltas)


def peft_call(model, combination_type: str, svd_rank: int, density: float, tag: str) -> tuple[float, str]:
    """One timed PEFT ``add_weighted_adapter`` call; returns (seconds, new adapter name)."""
    name = f"{combination_type}_{tag}"  # a fresh name each time: PEFT silently ignores a reused one
    t0 = time.perf_counter()
    model.add_weighted_adapter([f"a{k}" for k in range(fx.N_ADAPTERS)], fx.WEIGHTS, adapter_name=name,
                               combination_type=combination_type, svd_rank=svd_rank, density=density,
                               svd_full_matrices=False)
    return time.perf_counter() - t0, name


def compare(delta, layers, adapter: str) -> tuple[float, float]:
    """(overall, worst module) relative Frobenius difference of our delta from PEFT's new adapter."""
    get = fx.peft_dense(layers, adapter)
    num = den = worst = 0.0
    for name in layers:
        theirs = get(name)
        mine = algebra.to_dense(delta[name], torch.float64) if name in delta else torch.zeros_like(theirs)
        d2, n2 = float((mine - theirs).pow(2).sum()), float(theirs.pow(2).sum())
        num, den, worst = num + d2, den + n2, max(worst, math.sqrt(d2 / n2))
    return math.sqrt(num / den), worst


def part_core(args, table: fx.Table, deltas, model, layers) -> None:
    """Part 1: core-space ties vs PEFT ties_svd(64): time ratio and rank."""
    print(f"[1] core-space ties (density {args.density}) vs PEFT ties_svd(svd_rank={CORE_SVD_RANK})", flush=True)
    t_ours, times, out = fx.median_time(lambda: ours(deltas, "ties", "minimal", density=args.density),
                                        args.fast_repeats)
    slow = [peft_call(model, "ties_svd", CORE_SVD_RANK, args.density, f"core{r}") for r in range(args.slow_repeats)]
    t_peft = statistics.median(t for t, _ in slow)
    max_rank = max(out.report.rank_out.values())
    diff, _ = compare(out.delta, layers, slow[-1][1])
    print(f"    lorablocks: median {fx.fmt_s(t_ours)} of {[round(t, 4) for t in times]}, ranks "
          f"{sorted(set(out.report.rank_out.values()))}; PEFT: {[round(t, 2) for t, _ in slow]} s; "
          f"(info) |core ties - PEFT ties_svd(64)| / |PEFT| = {diff:.2f}", flush=True)
    for _, name in slow:
        model.delete_adapter(name)
    ratio = t_peft / t_ours
    table.add("[1] core-space ties vs PEFT ties_svd(64), 1 layer", fx.fmt_s(t_ours), fx.fmt_s(t_peft),
              f"{ratio:.0f}x", f">= {FLOOR_CORE:.0f}x", ratio >= FLOOR_CORE, "core_time", lorablocks_s=t_ours,
              lorablocks_all_s=times, peft_s=t_peft, speedup=ratio)
    table.add("[1] core-space ties: largest module rank", str(max_rank), "", "", f"<= {CORE_SVD_RANK}",
              max_rank <= CORE_SVD_RANK, "core_rank", ranks=out.report.rank_out, info_rel_diff_vs_peft=diff)


def part_full(args, table: fx.Table, deltas, model, layers, method: str) -> None:
    """Part 2: full-space ``method`` vs PEFT ``method_svd`` at a rank that loses nothing: time and agreement."""
    kind = f"{method}_svd"
    print(f"[2] full-space {method} (density {args.density}, rank {FULL_RANK}) vs PEFT {kind}(svd_rank={FULL_RANK})",
          flush=True)
    t_ours, t_peft, out, name = [], [], None, None
    for rep in range(args.slow_repeats):  # alternate the two sides
        t0 = time.perf_counter()
        out = ours(deltas, method, FULL_RANK, density=args.density, space="full")
        t_ours.append(time.perf_counter() - t0)
        if name is not None:
            model.delete_adapter(name)
        t, name = peft_call(model, kind, FULL_RANK, args.density, f"full{rep}")
        t_peft.append(t)
    err, worst = compare(out.delta, layers, name)
    model.delete_adapter(name)
    to, tp = statistics.median(t_ours), statistics.median(t_peft)
    print(f"    lorablocks: {[round(t, 2) for t in t_ours]} s, truncation error {out.report.overall_rel_error:.1e}; "
          f"PEFT: {[round(t, 2) for t in t_peft]} s; rel. error vs PEFT {err:.1e} (worst module {worst:.1e})", flush=True)
    ratio = tp / to
    table.add(f"[2] full-space {method} vs PEFT {kind}({FULL_RANK}): time", fx.fmt_s(to), fx.fmt_s(tp),
              f"{ratio:.2f}x", f">= {FLOOR_FULL_TIME:.1f}x", ratio >= FLOOR_FULL_TIME, f"full_{method}_time",
              lorablocks_s=to, lorablocks_all_s=t_ours, peft_s=tp, peft_all_s=t_peft, speedup=ratio)
    ok = err <= FLOOR_FULL_ERR and worst <= FLOOR_FULL_ERR
    table.add(f"[2] full-space {method} vs PEFT {kind}: rel. error", f"{err:.1e}", f"worst {worst:.1e}", "",
              f"<= {FLOOR_FULL_ERR:.0e}", ok, f"full_{method}_error", overall=err, worst_module=worst)


def main(args: argparse.Namespace) -> int:
    """Build the fixture once, run the parts, print the table; 0 when every floor passes."""
    torch.set_num_threads(args.threads)
    import peft
    import transformers

    print(f"bench_methods: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, python {platform.python_version()}, torch "
          f"{torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, torch threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} CPUs visible, density {args.density}", flush=True)
    t_start = time.perf_counter()
    table = fx.Table()
    tmp = Path(tempfile.mkdtemp(prefix="bench_methods_"))
    try:
        factors = fx.make_factors(1, args.seed)
        folders = [tmp / f"adapter_{k}" for k in range(fx.N_ADAPTERS)]
        for f, fac in zip(folders, factors):
            fx.write_peft_adapter(fac, f)
        deltas = [load_adapter(f).delta for f in folders]
        model = fx.build_peft(1, folders)
        layers = fx.peft_lora_layers(model)
        if 1 in args.parts:
            part_core(args, table, deltas, model, layers)
        if 2 in args.parts:
            for method in ("ties", "magnitude_prune"):
                part_full(args, table, deltas, model, layers, method)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    table.print()
    print(f"total benchmark time {time.perf_counter() - t_start:.0f} s; "
          + ("ALL FLOORS PASS" if not table.failed else f"FAILED: {'; '.join(table.failed)}"))
    if args.json is not None:
        args.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "threads": args.threads, "density": args.density,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "peft": peft.__version__},
            "results": table.results, "passed": not table.failed}, indent=2, default=str) + "\n")
    return 0 if not table.failed else 1


if __name__ == "__main__":
    sys.exit(main(ARGS))
