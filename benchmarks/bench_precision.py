"""bf16 against fp32 on the default model, side by side in one run: step time, loss curves, perplexities.

    .venv/bin/python benchmarks/bench_precision.py [--data-root ../shared/data] [--steps 30] [--threads 2] [--json FILE]

Same model (SmolLM2-135M), LoRA (r 4, alpha 64, the Llama targets), batches (8 x 128 tokens, math), seed
and thread count (``--threads``, default 2) for every variant:

1. **speed**: interleaved rounds on one LoRA model. Each round runs the real training step
   (``train._train_step``: forward, backward, clipping, AdamW) of every variant on the *same* batch, the
   order rotated per round, after one warm-up round; the per-round time ratio fp32 / bf16 is the answer
   tokens/s ratio of that batch, and the median over rounds is reported (robust to the load of a shared
   machine drifting between runs). Variants: ``fp32``; ``bf16`` (what training uses: bf16 autocast, with
   the cross-entropy and, on a CPU, attention in float32); ``bf16, bf16 attention`` (for
   the record: why attention stays float32 on a CPU). Floor: bf16 >= 1.4x fp32 answer tokens/s.
2. **curves**: three full ``train_adapter`` runs of ``--steps`` steps, validation every ``--eval-every``
   steps on the first ``--val-limit`` math validation examples: fp32 seed 0, bf16 seed 0, fp32 seed 1.
   Noise criterion: the final validation losses of bf16 and fp32 (seed 0) agree if their difference is at
   most max(0.02 nats, the difference between the two fp32 seeds). Each run's own answer tokens/s
   (validation excluded) is printed too; runs are sequential, so that ratio feels the machine's load.
3. **eval**: :func:`~lorablocks.passes.evaluate.evaluate_perplexity` in fp32 and bf16 on the first
   ``--eval-limit`` test examples of math and medicine, for the base model and with the fp32 run's adapter
   merged. Floor: every perplexity (per domain and joint) within 0.5 % of fp32.

Exit status 1 if a floor or the noise criterion fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Waiting OpenMP threads sleep instead of spinning (set before torch loads its OpenMP runtime): on a shared
# machine, spinning threads of a 2-thread step fight the other processes and single steps take 10-30x longer.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from lorablocks.files.adapters import load_adapter
from lorablocks.model.models import load_model
from lorablocks.training.data import resolve_domains
from lorablocks.passes.evaluate import evaluate_perplexity, prepare_eval_set
from lorablocks.training.precision import resolve_precision
from lorablocks.training.train import TrainConfig, train_adapter

SPEED_FLOOR = 1.4
EVAL_TOLERANCE = 0.005
NOISE_FLOOR_NATS = 0.02


def _train_config(args, out: str, **kw) -> TrainConfig:
    base = dict(model=args.model, data=[str(Path(args.data_root) / "math")], out=out, batch_size=args.batch_size,
                max_length=args.max_length, train_limit=args.train_limit, checkpoint_every=0, max_steps=args.steps,
                eval_every=args.eval_every, val_limit=args.val_limit)
    return TrainConfig(**{**base, **kw})


def bench_speed(model, tok, args) -> dict:
    """Interleaved training steps of each variant on the same batches; median per-round time ratios."""
    from accelerate import Accelerator

    from lorablocks.training import train as T

    cfg = _train_config(args, "unused", max_steps=args.rounds + 1, val_limit=0, warmup_steps=0)
    fp32, bf16 = resolve_precision("fp32", "cpu"), resolve_precision("bf16", "cpu")
    accelerator = Accelerator(mixed_precision="no", cpu=True)
    domains = resolve_domains(cfg.data)
    data = T._prepare_data(cfg, tok, domains, *T._load_examples(cfg, domains))
    peft_model, targets = T._wrap_lora(cfg, model)
    try:
        run = T._prepare_optimizer(cfg, peft_model, targets, accelerator, fp32)
        bf16_run = dataclasses.replace(run, precision=bf16)
        # name -> (the run, the precision whose attention switch applies)
        variants = {"fp32": (run, fp32), "bf16": (bf16_run, bf16), "bf16, bf16 attention": (bf16_run, fp32)}
        names = list(variants)
        times: dict[str, list[float]] = {n: [] for n in names}
        tokens: list[int] = []
        for r in range(args.rounds + 1):  # round 0 warms up
            for name in names[r % len(names):] + names[: r % len(names)]:
                lora, attention = variants[name]
                with attention.attention(peft_model):
                    t0 = time.perf_counter()
                    entry = T._train_step(cfg, lora, data, r)
                    elapsed = time.perf_counter() - t0
                if r:
                    times[name].append(elapsed)
                    if args.verbose:
                        print(f"  round {r} {name}: {times[name][-1]:.2f} s", flush=True)
            if r:
                tokens.append(entry["answer_tokens"])
    finally:
        peft_model.unload()
    out = {"rounds": args.rounds, "bf16_precision": bf16.to_dict(), "answer_tokens_per_round": tokens, "seconds": times}
    for name in names:
        out[name] = {"median_step_s": statistics.median(times[name]),
                     "median_answer_tokens_per_s": statistics.median(n / t for n, t in zip(tokens, times[name]))}
        out[name]["ratio_vs_fp32"] = statistics.median(a / b for a, b in zip(times["fp32"], times[name]))
    out["floor"] = SPEED_FLOOR
    out["passed"] = out["bf16"]["ratio_vs_fp32"] >= SPEED_FLOOR
    return out


def bench_curves(model, tok, args, folder: Path) -> dict:
    """fp32 seed 0, bf16 seed 0, fp32 seed 1: validation curves, final-loss agreement, per-run throughput."""
    runs = {}
    for name, precision, seed in (("fp32", "fp32", 0), ("bf16", "bf16", 0), ("fp32 seed 1", "fp32", 1)):
        cfg = _train_config(args, str(folder / name.replace(" ", "-")), precision=precision, seed=seed)
        rec = train_adapter(cfg, model=model, tokenizer=tok, progress=False).record
        runs[name] = {"precision": rec["precision"], "seed": seed, "train_seconds": rec["train_seconds"],
                      "validation_seconds": rec["validation_seconds"],
                      "answer_tokens_per_s": rec["answer_tokens_per_second"], "adapter": cfg.out,
                      "validation": [(v["step"], v["loss"]) for v in rec["validation"]],
                      "train_loss": [e["loss"] for e in rec["loss_curve"]]}
        print(f"  trained {name}: {rec['train_seconds']:.0f} s, {rec['answer_tokens_per_second']:.0f} answer tok/s, "
              f"final validation loss {rec['validation'][-1]['loss']:.4f}", flush=True)
    final = {n: r["validation"][-1][1] for n, r in runs.items()}
    diff, seed_spread = final["bf16"] - final["fp32"], abs(final["fp32 seed 1"] - final["fp32"])
    noise = max(NOISE_FLOOR_NATS, seed_spread)
    return {"runs": runs, "final_validation": final, "bf16_minus_fp32": diff, "fp32_seed_spread": seed_spread,
            "noise": noise, "agree": abs(diff) <= noise,
            "run_throughput_ratio": runs["bf16"]["answer_tokens_per_s"] / runs["fp32"]["answer_tokens_per_s"]}


def bench_eval(model, tok, args, adapter: str | None) -> dict:
    """Perplexities in fp32 and bf16, base model and with ``adapter`` merged; relative differences."""
    domains = resolve_domains([str(Path(args.data_root) / d) for d in ("math", "medicine")])
    es = prepare_eval_set(tok, domains, split="test", limit=args.eval_limit)
    cases = {"base": None} | ({"+ fp32 adapter": load_adapter(adapter).delta} if adapter else {})
    out = {}
    for case, delta in cases.items():
        res, secs = {}, {}
        for precision in ("fp32", "bf16"):
            t0 = time.perf_counter()
            r = evaluate_perplexity(model, es, delta, precision=precision)
            secs[precision] = time.perf_counter() - t0
            res[precision] = {**{n: s.perplexity for n, s in r.domains.items()}, "joint": r.joint.perplexity}
        rel = {k: res["bf16"][k] / res["fp32"][k] - 1 for k in res["fp32"]}
        out[case] = {"perplexity": res, "relative_difference": rel, "seconds": secs,
                     "passed": all(abs(v) < EVAL_TOLERANCE for v in rel.values())}
    return out


def _print_speed(s: dict) -> None:
    print(f"speed ({s['rounds']} interleaved rounds; bf16: {s['bf16_precision']['reason']})")
    for name in ("fp32", "bf16", "bf16, bf16 attention"):
        v = s[name]
        print(f"  {name:21s} {v['median_step_s']:6.2f} s/step  {v['median_answer_tokens_per_s']:7.0f} answer tok/s  "
              f"{v['ratio_vs_fp32']:.3f}x fp32")
    print(f"  bf16 vs fp32: {s['bf16']['ratio_vs_fp32']:.3f}x answer tokens/s (floor {SPEED_FLOOR}x): "
          f"{'PASS' if s['passed'] else 'FAIL'}", flush=True)


def _print_curves(c: dict) -> None:
    names = list(c["runs"])
    print("validation loss    " + "".join(f"{n:>13s}" for n in names) + "   bf16 - fp32")
    curves = [dict(c["runs"][n]["validation"]) for n in names]
    for step in curves[0]:
        print(f"  step {step:3d}         " + "".join(f"{cv[step]:13.4f}" for cv in curves)
              + f"   {curves[1][step] - curves[0][step]:+.4f}")
    print(f"  final: bf16 - fp32 = {c['bf16_minus_fp32']:+.4f} nats; noise = max({NOISE_FLOOR_NATS}, fp32 seed "
          f"spread {c['fp32_seed_spread']:.4f}) = {c['noise']:.4f}: {'AGREE' if c['agree'] else 'DIFFER'}")
    print(f"  whole-run answer tokens/s (sequential runs): " + ", ".join(
        f"{n} {c['runs'][n]['answer_tokens_per_s']:.0f}" for n in names)
        + f"; bf16/fp32 {c['run_throughput_ratio']:.2f}x", flush=True)


def _print_eval(e: dict, limit: int) -> None:
    print(f"eval ({limit} test examples each of math and medicine, perplexity fp32 vs bf16)")
    for case, v in e.items():
        p, rel = v["perplexity"], v["relative_difference"]
        parts = [f"{k} {p['fp32'][k]:.4f} vs {p['bf16'][k]:.4f} ({100 * rel[k]:+.3f} %)" for k in rel]
        print(f"  {case}: " + "; ".join(parts) + f"; {v['seconds']['fp32']:.0f} s vs {v['seconds']['bf16']:.0f} s: "
              f"{'PASS' if v['passed'] else 'FAIL'} (within {100 * EVAL_TOLERANCE} %)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--train-limit", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=8, help="interleaved timing rounds (after one warm-up)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--val-limit", type=int, default=16)
    ap.add_argument("--eval-limit", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", default="speed,curves,eval", help="comma-separated subset of speed,curves,eval")
    ap.add_argument("--json", default=None)
    ap.add_argument("--verbose", action="store_true", help="print every timed step")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    print(f"bench_precision: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, auto resolves to: {resolve_precision('auto', 'cpu').reason}", flush=True)
    model, tok = load_model(args.model)
    results: dict = {"args": vars(args)}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        if "speed" in parts:
            results["speed"] = bench_speed(model, tok, args)
            _print_speed(results["speed"])
            ok &= results["speed"]["passed"]
        if "curves" in parts:
            print(f"curves ({args.steps} steps, batch {args.batch_size} x {args.max_length}, validation every "
                  f"{args.eval_every} on {args.val_limit} math examples)", flush=True)
            results["curves"] = bench_curves(model, tok, args, Path(tmp))
            _print_curves(results["curves"])
            ok &= results["curves"]["agree"]
        if "eval" in parts:
            adapter = results["curves"]["runs"]["fp32"]["adapter"] if "curves" in results else None
            results["eval"] = bench_eval(model, tok, args, adapter)
            _print_eval(results["eval"], args.eval_limit)
            ok &= all(v["passed"] for v in results["eval"].values())
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
