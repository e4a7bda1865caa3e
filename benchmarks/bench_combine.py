#!/usr/bin/env python
"""Floors benchmark (issue 2): lorablocks vs PEFT / dense baselines, measured side by side in one run.

Four random rank-16 LoRA adapters (lora_alpha 32, so scale 2) over the TinyLlama-1.1B projection shapes
(``(out, in)``: q 2048x2048, k 256x2048, v 256x2048, o 2048x2048, gate 5632x2048, up 5632x2048,
down 2048x5632), weights ``1, 0.8, -0.6, 1.2``. The adapters share part of their factors, so that their
cosines are far from zero and the similarity check means something; their exact sum still has rank 64.

1. ``combine``: ``algebra.add`` + ``algebra.compress(rank="minimal")`` in memory vs PEFT
   ``add_weighted_adapter(..., combination_type="svd", svd_rank=64, svd_full_matrices=False)`` on a
   ``LlamaForCausalLM`` with ``--layers`` layers holding the same four adapters (read from the same files).
   Both results are compared with the dense weighted sum computed in float64 (PEFT's result is read back as
   ``scaling * B @ A`` of the new adapter, i.e. what PEFT applies in its forward pass).
2. ``cli``: the whole ``lorablocks combine`` process (console script, start-up included) on adapter folders
   over ``--cli-layers`` layers vs that PEFT call on the same layers (the PEFT side is timed for the call
   only: model construction and adapter loading are not counted against it). Peak RSS of the process vs
   ``2 x inputs + bare interpreter`` (``python -c 'import lorablocks.cli'``), and a check, in a separate
   in-process run of the CLI, that combine builds no ``nn.Module`` (so it loads no base model): the
   adapters' ``base_model_name_or_path`` points nowhere and the hub is offline.
3. ``similarity``: ``overlap.overlap_matrices`` vs cosines from dense float32 deltas (each dense delta
   formed once, norms once per module, ``(D_i * D_j).sum()`` per pair; RMS and mean over modules), equal to
   1e-5. (Not ``torch.linalg.norm`` / ``torch.dot``: on 11.5M float32 entries they are ~1e-4 off on CPU.)

Timings are compared only as ratios inside one run (the machine is shared and noisy). Torch threads are set
with ``--threads`` (default 1) for this process and, through ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``, for
every child process. The fast side is the median of several repeats after a warm-up; the slow PEFT / dense
side is timed once, or as the median of ``--slow-repeats``. ``--quick`` also estimates part 2's PEFT time as
``--cli-layers`` x part 1's per-layer PEFT time (PEFT's svd path costs the same per module) instead of
building and timing a second PEFT model: about 2 minutes instead of 6 on 2 busy cores.

Exit status: 0 when every floor and accuracy check passes, 1 otherwise.

    .venv/bin/python benchmarks/bench_combine.py            # full run
    .venv/bin/python benchmarks/bench_combine.py --quick    # fewer repeats
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch / BLAS threads here and in child processes (default 1)")
    p.add_argument("--layers", type=int, default=1, help="decoder layers for parts 1 and 3 (default 1)")
    p.add_argument("--cli-layers", type=int, default=4, help="decoder layers for part 2, the CLI process (default 4)")
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats (fast side 3, slow side 1); part 2's PEFT time is estimated as --cli-layers x "
                        "part 1's per-layer PEFT time instead of measured (PEFT's svd cost is per module)")
    p.add_argument("--fast-repeats", type=int, default=None, help="repeats of the fast side (default 7, --quick 3)")
    p.add_argument("--slow-repeats", type=int, default=None, help="repeats of the slow side (default 1)")
    p.add_argument("--parts", default="1,2,3", help="comma-separated parts to run (default 1,2,3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--keep", type=Path, default=None, help="keep the adapter folders in this (new) folder")
    args = p.parse_args(argv)
    args.fast_repeats = args.fast_repeats or (3 if args.quick else 7)
    args.slow_repeats = args.slow_repeats or 1
    args.parts = {int(x) for x in args.parts.split(",") if x.strip()}
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # before torch is imported, so that its BLAS pools see it too
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lorablocks.core import algebra  # noqa: E402
from lorablocks.files.adapters import load_adapter  # noqa: E402
from lorablocks.core.overlap import overlap_matrices  # noqa: E402

#: TinyLlama-1.1B projections, (out, in) as in nn.Linear.
SHAPES = {
    "self_attn.q_proj": (2048, 2048),
    "self_attn.k_proj": (256, 2048),
    "self_attn.v_proj": (256, 2048),
    "self_attn.o_proj": (2048, 2048),
    "mlp.gate_proj": (5632, 2048),
    "mlp.up_proj": (5632, 2048),
    "mlp.down_proj": (2048, 5632),
}
RANK, ALPHA, N_ADAPTERS = 16, 32, 4
WEIGHTS = [1.0, 0.8, -0.6, 1.2]
#: How much of a shared component each adapter's factors carry (gives cosines from ~0 to ~0.6).
SHARED = [0.0, 0.5, 1.0, 2.0]
SVD_RANK = N_ADAPTERS * RANK  # = sum of ranks: PEFT's svd is exact in principle
BASE = "/nonexistent/TinyLlama-1.1B"  # no base model to load: combine must not need one

FLOOR_COMBINE = 50.0
FLOOR_CLI = 20.0
FLOOR_SIM = 20.0
FLOOR_REL_ERR = 1e-5
FLOOR_SIM_ERR = 1e-5


# --------------------------------------------------------------------------------------------- adapters
def module_names(layers: int) -> list[str]:
    return [f"model.layers.{l}.{m}" for l in range(layers) for m in SHAPES]


def make_factors(layers: int, seed: int) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per adapter, per module: raw PEFT ``(lora_A (r,in), lora_B (out,r))`` in float32."""
    g = torch.Generator().manual_seed(seed)
    out: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(N_ADAPTERS)]
    for name in module_names(layers):
        o, i = SHAPES[name.split(".", 3)[3]]
        A0 = torch.randn(RANK, i, generator=g) / math.sqrt(i)
        B0 = torch.randn(o, RANK, generator=g) * 0.02
        for k in range(N_ADAPTERS):
            c = SHARED[k]
            A = (c * A0 + torch.randn(RANK, i, generator=g) / math.sqrt(i)) / math.sqrt(1 + c * c)
            B = (c * B0 + torch.randn(o, RANK, generator=g) * 0.02) / math.sqrt(1 + c * c)
            out[k][name] = (A.contiguous(), B.contiguous())
    return out


def write_peft_adapter(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], folder: Path) -> None:
    """A genuine PEFT LoRA folder (config written by peft's LoraConfig, r=16, lora_alpha=32)."""
    from peft import LoraConfig

    folder.mkdir(parents=True)
    cfg = LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=sorted({n.rsplit(".", 1)[1] for n in factors}),
        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", base_model_name_or_path=BASE,
    )
    cfg.save_pretrained(str(folder))
    tensors = {}
    for name, (A, B) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A
        tensors[f"base_model.model.{name}.lora_B.weight"] = B
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def dense_reference(factors, name: str) -> torch.Tensor:
    """``sum_k w_k * (alpha/r) * B_k @ A_k`` in float64 from the raw factors."""
    s = ALPHA / RANK
    ref = None
    for w, f in zip(WEIGHTS, factors):
        A, B = f[name]
        term = (w * s) * (B.double() @ A.double())
        ref = term if ref is None else ref.add_(term)
    return ref


def rel_errors(factors, get_dense) -> tuple[float, float]:
    """(overall, worst module) relative Frobenius error of ``get_dense(name)`` vs the float64 reference."""
    num = den = 0.0
    worst = 0.0
    for name in factors[0]:
        ref = dense_reference(factors, name)
        diff = float(torch.linalg.norm(get_dense(name).double() - ref)) ** 2
        nrm = float(torch.linalg.norm(ref)) ** 2
        num, den = num + diff, den + nrm
        worst = max(worst, math.sqrt(diff / nrm))
        del ref
    return math.sqrt(num / den), worst


# --------------------------------------------------------------------------------------------- PEFT side
def build_peft(layers: int, folders: list[Path]):
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    for name, (o, i) in SHAPES.items():  # the TinyLlama shapes really are what PEFT sees
        lin = base.model.layers[0].get_submodule(name)
        assert tuple(lin.weight.shape) == (o, i), (name, lin.weight.shape)
    model = PeftModel.from_pretrained(base, str(folders[0]), adapter_name="a0")
    for k in range(1, len(folders)):
        model.load_adapter(str(folders[k]), adapter_name=f"a{k}")
    return model


def peft_lora_layers(model) -> dict[str, object]:
    from peft.tuners.lora import LoraLayer

    out = {}
    for key, mod in model.base_model.model.named_modules():
        if isinstance(mod, LoraLayer):
            out[key] = mod
    return out


def time_peft_svd(model, reps: int) -> tuple[list[float], str]:
    times, name = [], ""
    for rep in range(reps):
        name = f"svd_combined_{rep}"  # a fresh name each time: PEFT silently ignores a reused one
        t0 = time.perf_counter()
        model.add_weighted_adapter(
            [f"a{k}" for k in range(N_ADAPTERS)], WEIGHTS, adapter_name=name,
            combination_type="svd", svd_rank=SVD_RANK, svd_full_matrices=False,
        )
        times.append(time.perf_counter() - t0)
    return times, name


def peft_dense(layers_by_name, adapter: str):
    """What PEFT adds to the weight for ``adapter``: ``scaling * B @ A`` (in float64)."""

    def get(name: str) -> torch.Tensor:
        lay = layers_by_name[name]
        A = lay.lora_A[adapter].weight.detach().double()
        B = lay.lora_B[adapter].weight.detach().double()
        return lay.scaling[adapter] * (B @ A)

    return get


# --------------------------------------------------------------------------------------------- helpers
def median_time(fn, reps: int, warmup: int = 1) -> tuple[float, list[float], object]:
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


_MEASURE = r"""
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
dt = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": p.returncode, "wall_s": dt, "maxrss_kb": ru.ru_maxrss,
                  "stderr": p.stderr[-2000:], "stdout": p.stdout[-2000:]}))
"""


def measure_process(cmd: list[str]) -> dict:
    """Wall time and peak RSS of one child process (timed inside a small wrapper, start-up included)."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(out.stdout)


_NO_MODEL = r"""
import json, sys
import torch.nn as nn
built = []
_orig = nn.Module.__init__
def _init(self, *a, **k):
    built.append(type(self).__module__ + "." + type(self).__qualname__)
    _orig(self, *a, **k)
nn.Module.__init__ = _init
from lorablocks.cli import run_app
rc = run_app(sys.argv[1:])
print(json.dumps({"rc": rc, "modules_built": built[:20], "n_modules_built": len(built),
                  "transformers_imported": "transformers" in sys.modules,
                  "modeling_utils_imported": "transformers.modeling_utils" in sys.modules,
                  "peft_imported": "peft" in sys.modules}))
"""


def lorablocks_exe() -> list[str]:
    exe = Path(sys.executable).parent / "lorablocks"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("lorablocks")
    if found:
        return [found]
    return [sys.executable, "-c", "from lorablocks.cli import main; main()"]


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str, str, str]] = []
        self.failed: list[str] = []
        self.results: dict[str, dict] = {}

    def add(self, what: str, ours: str, theirs: str, ratio: str, floor: str, ok: bool | None, key: str, **data) -> None:
        verdict = "-" if ok is None else ("PASS" if ok else "FAIL")
        self.rows.append((what, ours, theirs, ratio, floor, verdict))
        self.results[key] = {"pass": ok, **data}
        if ok is False:
            self.failed.append(what)

    def print(self) -> None:
        head = ("measurement", "lorablocks", "baseline", "ratio", "floor", "result")
        widths = [max(len(r[c]) for r in [head, *self.rows]) for c in range(6)]
        line = "  ".join("-" * w for w in widths)
        fmt = lambda r: "  ".join(s.ljust(w) if c == 0 else s.rjust(w) for c, (s, w) in enumerate(zip(r, widths)))  # noqa: E731
        print(fmt(head))
        print(line)
        for r in self.rows:
            print(fmt(r))
        print(line)


def fmt_s(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def fmt_mb(b: float) -> str:
    return f"{b / 2**20:.0f} MiB"


# --------------------------------------------------------------------------------------------- parts
def part_combine(args, table: Table, factors, folders, peft_cache: dict) -> None:
    print(f"[1] combine: {args.layers} layer(s), {len(factors[0])} modules, 4 adapters of rank {RANK}", flush=True)
    deltas = [load_adapter(f).delta for f in folders]

    def ours():
        return algebra.compress(algebra.add(deltas, WEIGHTS), rank="minimal")

    t_ours, times_ours, (combined, report) = median_time(ours, args.fast_repeats)
    err_ours, worst_ours = rel_errors(factors, lambda n: algebra.to_dense(combined[n], torch.float64))
    ranks = sorted(set(report.rank_out.values()))
    print(f"    lorablocks add+compress(minimal): median {fmt_s(t_ours)} of {[round(t, 4) for t in times_ours]}, "
          f"ranks {ranks}, rel err {err_ours:.2e} (worst module {worst_ours:.2e})", flush=True)

    t0 = time.perf_counter()
    model = build_peft(args.layers, folders)
    print(f"    PEFT model with {args.layers} layer(s) built and 4 adapters loaded in {time.perf_counter() - t0:.1f} s "
          "(not timed against PEFT)", flush=True)
    layers_by_name = peft_lora_layers(model)
    # Fairness: PEFT and lorablocks read the same delta (same scale) from the same files.
    probe = module_names(1)[0]
    d_peft = layers_by_name[probe].get_delta_weight("a1").double()
    d_ours = algebra.to_dense(deltas[1][probe], torch.float64)
    input_agree = float(torch.linalg.norm(d_peft - d_ours) / torch.linalg.norm(d_ours))
    times_peft, name = time_peft_svd(model, args.slow_repeats)
    t_peft = statistics.median(times_peft)
    lay0 = layers_by_name[probe]
    print(f"    PEFT add_weighted_adapter(svd, svd_rank={SVD_RANK}): {[round(t, 2) for t in times_peft]} s; "
          f"new adapter r={lay0.r[name]}, scaling={lay0.scaling[name]}", flush=True)
    err_peft, worst_peft = rel_errors(factors, peft_dense(layers_by_name, name))
    print(f"    PEFT rel err {err_peft:.2e} (worst module {worst_peft:.2e}); input deltas agree to {input_agree:.1e}",
          flush=True)
    peft_cache["per_layer"] = t_peft / args.layers
    if args.layers == args.cli_layers:
        peft_cache[args.layers] = t_peft
    del model, layers_by_name

    ratio = t_peft / t_ours
    table.add(f"[1] exact minimal combine, {args.layers} layer(s), time", fmt_s(t_ours), fmt_s(t_peft),
              f"{ratio:.0f}x", f">= {FLOOR_COMBINE:.0f}x", ratio >= FLOOR_COMBINE, "combine_time",
              lorablocks_s=t_ours, lorablocks_all_s=times_ours, peft_s=t_peft, peft_all_s=times_peft, speedup=ratio)
    table.add("[1] rel. Frobenius error vs float64 dense sum", f"{err_ours:.1e}", f"{err_peft:.1e}", "",
              f"<= {FLOOR_REL_ERR:.0e} both", max(err_ours, err_peft) <= FLOOR_REL_ERR, "combine_error",
              lorablocks=err_ours, lorablocks_worst_module=worst_ours, peft=err_peft, peft_worst_module=worst_peft)
    table.add("[1] result rank per module (minimal / PEFT svd_rank)", "/".join(map(str, ranks)), str(SVD_RANK), "",
              "", None, "combine_rank", lorablocks=ranks, peft=SVD_RANK)
    table.add("[1] PEFT and lorablocks read the same input delta", f"{input_agree:.1e}", "", "", "<= 1e-6",
              input_agree <= 1e-6, "input_agreement", rel_diff=input_agree)


def part_cli(args, table: Table, tmp: Path, peft_cache: dict) -> None:
    L = args.cli_layers
    print(f"[2] lorablocks combine process: {L} layer(s)", flush=True)
    factors = make_factors(L, args.seed + 1)
    folders = [tmp / f"cli_adapter_{k}" for k in range(N_ADAPTERS)]
    for f, fac in zip(folders, factors):
        write_peft_adapter(fac, f)
    inputs = sum((f / "adapter_model.safetensors").stat().st_size for f in folders)
    exe = lorablocks_exe()
    wstr = ",".join(str(w) for w in WEIGHTS)

    interp = [measure_process([sys.executable, "-c", "import lorablocks.cli"]) for _ in range(3)]
    interp_rss = statistics.median(r["maxrss_kb"] for r in interp) * 1024
    interp_wall = statistics.median(r["wall_s"] for r in interp)

    runs = []
    for rep in range(1 + args.fast_repeats):  # the first one warms the page cache; all are recorded
        out = tmp / f"cli_out_{rep}"
        r = measure_process([*exe, "combine", *map(str, folders), "--weights", wstr, "--rank", "minimal",
                             "--out", str(out)])
        if r["rc"] != 0:
            print(r["stderr"], file=sys.stderr)
            raise SystemExit(f"lorablocks combine failed with exit code {r['rc']}")
        runs.append(r)
        if rep > 0:
            shutil.rmtree(out)
    timed = runs[1:]
    t_cli = statistics.median(r["wall_s"] for r in timed)
    peak = max(r["maxrss_kb"] for r in timed) * 1024
    res = load_adapter(tmp / "cli_out_0")
    err_cli, worst_cli = rel_errors(factors, lambda n: algebra.to_dense(res.delta[n], torch.float64))
    print(f"    combine process: median {fmt_s(t_cli)} of {[round(r['wall_s'], 2) for r in timed]}, peak RSS "
          f"{fmt_mb(peak)}; inputs {fmt_mb(inputs)}; bare interpreter {fmt_mb(interp_rss)} in {fmt_s(interp_wall)}; "
          f"output rel err {err_cli:.1e}", flush=True)

    chk = subprocess.run([sys.executable, "-c", _NO_MODEL, "combine", *map(str, folders), "--weights", wstr,
                          "--rank", "minimal", "--out", str(tmp / "cli_out_check")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        nm = json.loads(chk.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        nm = {"rc": chk.returncode, "n_modules_built": -1, "error": chk.stderr[-500:]}
    print(f"    no-model check: {nm}", flush=True)

    peft_label = ""
    if L in peft_cache:
        t_peft = peft_cache[L]
        print(f"    PEFT call on {L} layer(s): reused from part 1 ({fmt_s(t_peft)})", flush=True)
    elif args.quick and "per_layer" in peft_cache:
        # --quick: PEFT's cost is per module (dense delta + SVD each), so L layers cost L x one layer.
        t_peft = peft_cache["per_layer"] * L
        peft_label = f" (est. {L}x1 layer)"
        print(f"    PEFT call on {L} layer(s): --quick, estimated as {L} x part 1's per-layer time = {fmt_s(t_peft)}",
              flush=True)
    else:
        t0 = time.perf_counter()
        model = build_peft(L, folders)
        print(f"    PEFT model with {L} layers built and adapters loaded in {time.perf_counter() - t0:.1f} s "
              "(not timed against PEFT)", flush=True)
        times_peft, _ = time_peft_svd(model, args.slow_repeats)
        t_peft = statistics.median(times_peft)
        print(f"    PEFT add_weighted_adapter(svd): {[round(t, 2) for t in times_peft]} s", flush=True)
        del model

    ratio = t_peft / t_cli
    bound = 2 * inputs + interp_rss
    table.add(f"[2] whole `lorablocks combine` process, {L} layers", fmt_s(t_cli), fmt_s(t_peft) + peft_label,
              f"{ratio:.0f}x",
              f">= {FLOOR_CLI:.0f}x", ratio >= FLOOR_CLI, "cli_time", lorablocks_s=t_cli,
              lorablocks_all_s=[r["wall_s"] for r in timed], peft_s=t_peft, peft_estimated=bool(peft_label),
              speedup=ratio,
              bare_interpreter_s=interp_wall)
    table.add("[2] combine peak RSS vs 2 x inputs + interpreter", fmt_mb(peak),
              f"{fmt_mb(bound)} (2x{fmt_mb(inputs)}+{fmt_mb(interp_rss)})", f"{peak / bound:.2f}", "< 1.00",
              peak < bound, "cli_memory", peak_rss_bytes=peak, inputs_bytes=inputs, interpreter_rss_bytes=interp_rss,
              excess_over_interpreter_bytes=peak - interp_rss)
    table.add("[2] combine output rel. error vs float64 dense sum", f"{err_cli:.1e}", "", "",
              f"<= {FLOOR_REL_ERR:.0e}", err_cli <= FLOOR_REL_ERR, "cli_error", overall=err_cli, worst_module=worst_cli)
    no_model = nm.get("rc") == 0 and nm.get("n_modules_built") == 0
    table.add("[2] combine builds no nn.Module (no base model)",
              f"{nm.get('n_modules_built')} modules", "", "", "0", no_model, "cli_no_model", **nm)
    table.add("[2]   (info) combine imports transformers / peft", f"{nm.get('transformers_imported')} / "
              f"{nm.get('peft_imported')}", "", "", "", None, "cli_imports")


def part_similarity(args, table: Table, folders) -> None:
    print(f"[3] similarity matrix: {args.layers} layer(s)", flush=True)
    deltas = [load_adapter(f).delta for f in folders]
    n = len(deltas)

    def ours():
        rms, mean, _ = overlap_matrices(deltas)
        return rms, mean

    def dense():
        D = [{m: x.B @ x.A for m, x in d.items()} for d in deltas]  # float32, formed once
        # (x * y).sum() (pairwise summation): torch.linalg.norm and torch.dot on 11.5M float32 entries are off by
        # ~1e-4 relative on CPU (torch 2.13), which alone would break the 1e-5 agreement.
        norms = [{m: math.sqrt(float((t * t).sum())) for m, t in d.items()} for d in D]
        rms = [[1.0] * n for _ in range(n)]
        mean = [[1.0] * n for _ in range(n)]
        for i in range(n):
            for j in range(i + 1, n):
                cos = [float((D[i][m] * D[j][m]).sum()) / (norms[i][m] * norms[j][m])
                       for m in D[i] if m in D[j]]
                rms[i][j] = rms[j][i] = math.sqrt(sum(c * c for c in cos) / len(cos))
                mean[i][j] = mean[j][i] = sum(cos) / len(cos)
        return rms, mean

    t_ours, times_ours, (r_o, m_o) = median_time(ours, args.fast_repeats)
    t_dense, times_dense, (r_d, m_d) = median_time(dense, args.slow_repeats, warmup=0)
    diff = max(abs(a - b) for X, Y in ((r_o, r_d), (m_o, m_d)) for ra, rb in zip(X, Y) for a, b in zip(ra, rb))
    off = [r_o[i][j] for i in range(n) for j in range(n) if i < j]
    print(f"    factored: median {fmt_s(t_ours)}; dense: {[round(t, 3) for t in times_dense]} s; RMS cosines "
          f"{[round(v, 4) for v in off]}; max |diff| {diff:.1e}", flush=True)
    ratio = t_dense / t_ours
    table.add(f"[3] similarity matrix (4 adapters), {args.layers} layer(s)", fmt_s(t_ours), fmt_s(t_dense),
              f"{ratio:.0f}x", f">= {FLOOR_SIM:.0f}x", ratio >= FLOOR_SIM, "similarity_time", lorablocks_s=t_ours,
              lorablocks_all_s=times_ours, dense_s=t_dense, dense_all_s=times_dense, speedup=ratio)
    table.add("[3] max |factored - dense| over RMS and mean cosines", f"{diff:.1e}", "", "",
              f"<= {FLOOR_SIM_ERR:.0e}", diff <= FLOOR_SIM_ERR, "similarity_error", max_abs_diff=diff,
              rms_cosines=off)


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    import peft
    import transformers

    print(f"bench_combine: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, python {platform.python_version()}, torch "
          f"{torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs visible, repeats fast "
          f"{args.fast_repeats} / slow {args.slow_repeats}", flush=True)
    t_start = time.perf_counter()
    table = Table()
    tmp = Path(tempfile.mkdtemp(prefix="bench_combine_"))
    try:
        factors = make_factors(args.layers, args.seed)
        folders = [tmp / f"adapter_{k}" for k in range(N_ADAPTERS)]
        for f, fac in zip(folders, factors):
            write_peft_adapter(fac, f)
        peft_cache: dict[int, float] = {}
        if 1 in args.parts:
            part_combine(args, table, factors, folders, peft_cache)
        if 3 in args.parts:
            part_similarity(args, table, folders)
        if 2 in args.parts:
            part_cli(args, table, tmp, peft_cache)
        if args.keep is not None:
            shutil.copytree(tmp, args.keep)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    table.print()
    total = time.perf_counter() - t_start
    print(f"total benchmark time {total:.0f} s; "
          + ("ALL FLOORS PASS" if not table.failed else f"FAILED: {'; '.join(table.failed)}"))
    if args.json is not None:
        args.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "threads": args.threads, "layers": args.layers,
            "cli_layers": args.cli_layers, "fast_repeats": args.fast_repeats, "slow_repeats": args.slow_repeats,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "peft": peft.__version__},
            "results": table.results, "passed": not table.failed}, indent=2, default=str) + "\n")
    return 0 if not table.failed else 1


if __name__ == "__main__":
    sys.exit(main(ARGS))
