#!/usr/bin/env python
"""Scale benchmark (issue 9): composing adapters shaped like a 70B Llama, as one process on 2 cores.

Four random rank-16 adapters over the Llama-3-70B projection shapes (hidden 8192, intermediate 28672,
64 query heads and 8 KV heads of 128: ``(out, in)`` q 8192x8192, k/v 1024x8192, o 8192x8192,
gate/up 28672x8192, down 8192x28672; all seven projections per layer), written with lorablocks'
streaming writer so that generating them needs no more memory than one module. Then, for 10 and 80 layers:

* ``lorablocks combine --rank minimal`` and ``lorablocks combine --method ties`` (core space) as child
  processes (console entry point, start-up included), their wall time and their peak resident memory
  (``VmHWM`` of the child itself, read at exit);
* the inputs' size on disk beside it;
* ``--methods ... regmean`` (issue 17): each adapter also gets input statistics on disk as regmean stores
  inputs this wide: per distinct input site of a layer (q/k/v, o, gate/up, down: widths 8192 and 28672) a
  rank-``--sketch-rank`` eigen sketch plus the exact diagonal (random, well-conditioned); regmean then reads
  one Gram at a time beside each module's factors and solves by Woodbury (never an ``in x in`` matrix).

The floor: each finishes, and the peak memory does not grow with the number of layers (80 vs 10 layers
within 1.25x), because combine streams one module at a time. PEFT is not run: ``add_weighted_adapter``
needs the base model instantiated (70.6e9 parameters: 141 GB in bf16, 282 GB in float32, against 24 GiB
here), and its ``ties_svd`` forms every dense delta (e.g. 28672x8192 float32 = 0.94 GB per module per
adapter) before a full SVD.

    .venv/bin/python benchmarks/bench_scale.py --layers 10 80      # about 3.3 GB of adapters at 80 layers
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # (out, in) per projection of one Llama-3-70B decoder layer
    "self_attn.q_proj": (8192, 8192), "self_attn.k_proj": (1024, 8192), "self_attn.v_proj": (1024, 8192),
    "self_attn.o_proj": (8192, 8192), "mlp.gate_proj": (28672, 8192), "mlp.up_proj": (28672, 8192),
    "mlp.down_proj": (8192, 28672),
}
RANK = 16

_CHILD = """
import sys, atexit
_PEAK_FILE = sys.argv[1]
def _peak():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            open(_PEAK_FILE, 'w').write(line.split()[1])
atexit.register(_peak)
sys.argv = ['lorablocks'] + sys.argv[2:]
from lorablocks.cli import main
main()
"""


def write_adapter(out: Path, layers: int, seed: int) -> None:
    """A PEFT adapter of rank 16 over every projection of ``layers`` layers, one module in memory at a time."""
    import torch

    from lorablocks.core.algebra import LowRank
    from lorablocks.files.writer import AdapterWriter

    g = torch.Generator().manual_seed(seed)
    with AdapterWriter(out, base_model="meta-llama/Meta-Llama-3-70B") as w:
        for layer in range(layers):
            for proj, (o, i) in SHAPES.items():
                w.add(f"model.layers.{layer}.{proj}",
                      LowRank(torch.randn(o, RANK, generator=g) * 0.01, torch.randn(RANK, i, generator=g) * 0.01))


SITES = {"self_attn.q_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "self_attn.o_proj": ("self_attn.o_proj",), "mlp.gate_proj": ("mlp.gate_proj", "mlp.up_proj"),
         "mlp.down_proj": ("mlp.down_proj",)}


def write_statistics(folder: Path, layers: int, seed: int, k: int) -> None:
    """Random sketched input statistics for every input site of ``layers`` layers, beside ``folder``'s adapter."""
    import torch

    from lorablocks.core.regmean import InputGram
    from lorablocks.files.statistics import STATS_NAME, write_statistics as write

    g = torch.Generator().manual_seed(1000 + seed)
    grams, modules = {}, {}
    for layer in range(layers):
        for site, fed in SITES.items():
            width = SHAPES[site][1]
            U, _ = torch.linalg.qr(torch.randn(width, k, generator=g))
            S = torch.rand(k, generator=g) + 0.5
            diag = (U * U) @ S + torch.rand(width, generator=g) * 0.1 + 0.01
            name = f"model.layers.{layer}.{site}"
            grams[name] = InputGram(diag=diag, U=U.contiguous(), S=S, tokens=4096)
            modules[name] = [f"model.layers.{layer}.{m}" for m in fed]
    write(folder / STATS_NAME, grams, modules, "meta-llama/Meta-Llama-3-70B", {"synthetic": True, "sketch_rank": k})


def run_child(args: list[str], env: dict[str, str]) -> tuple[float, int, int, str]:
    """Wall seconds, exit code, peak RSS in bytes (the child's own VmHWM), stderr tail."""
    with tempfile.NamedTemporaryFile() as peak:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _CHILD, peak.name, *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t0
        text = Path(peak.name).read_text().strip()
    return wall, proc.returncode, int(text or 0) * 1024, proc.stderr.strip().splitlines()[-1:] and proc.stderr.strip().splitlines()[-1] or ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[10, 80])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=["sum", "ties"])
    p.add_argument("--keep", type=Path, default=None, help="keep the adapters in this folder")
    p.add_argument("--sketch-rank", type=int, default=64, help="regmean: eigenpairs per stored Gram sketch")
    a = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    root = Path(a.keep or tempfile.mkdtemp(prefix="bench-scale-"))
    peaks: dict[tuple[str, int], int] = {}
    ok = True
    try:
        for layers in a.layers:
            folders = [root / f"l{layers}-a{k}" for k in range(4)]
            t0 = time.perf_counter()
            for k, f in enumerate(folders):
                if not f.exists():
                    write_adapter(f, layers, seed=k)
            if "regmean" in a.methods:
                from lorablocks.files.statistics import STATS_NAME

                for k, f in enumerate(folders):
                    if not (f / STATS_NAME).exists():
                        write_statistics(f, layers, seed=k, k=a.sketch_rank)
            size = sum(x.stat().st_size for f in folders for x in f.iterdir())
            print(f"{layers} layers: 4 adapters of rank {RANK}, {size / 2**30:.2f} GiB on disk "
                  f"(written in {time.perf_counter() - t0:.0f} s)", flush=True)
            for method in a.methods:
                out = root / f"out-{layers}-{method}"
                shutil.rmtree(out, ignore_errors=True)
                weights = "1,0.8,0.6,1.2" if method == "regmean" else "1,0.8,-0.6,1.2"  # regmean: no negative weights
                args = ["combine", *map(str, folders), "--weights", weights, "--method", method,
                        "--rank", "minimal", "--out", str(out)]
                wall, rc, peak, tail = run_child(args, env)
                peaks[(method, layers)] = peak
                ok &= rc == 0
                print(f"  combine --method {method}: exit {rc}, {wall:.1f} s, peak RSS {peak / 2**20:.0f} MiB"
                      f"{'' if rc == 0 else ' :: ' + tail}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
        lo, hi = min(a.layers), max(a.layers)
        for method in a.methods:
            if (method, lo) in peaks and (method, hi) in peaks and peaks[(method, lo)]:
                ratio = peaks[(method, hi)] / peaks[(method, lo)]
                good = ratio <= 1.25
                ok &= good
                print(f"floor {method}: peak RSS {hi} vs {lo} layers = {ratio:.2f}x (<= 1.25x: {'PASS' if good else 'FAIL'})")
    finally:
        if a.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
