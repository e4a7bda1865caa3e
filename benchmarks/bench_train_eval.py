"""Training and evaluation throughput against the plain transformers baselines, and training peak memory.

    .venv/bin/python benchmarks/bench_train_eval.py [--data ../shared/data/math] [--steps 6] [--json FILE]

Measured side by side in one run, on the same loaded model and the same examples:

1. **evaluation**: counted (answer + EOS) tokens per second of :func:`lorablocks.passes.evaluate.evaluate_perplexity`
   (length-bucketed batches, output head on counted positions only) versus a plain transformers loop:
   batches of ``--eval-batch`` examples in file order, right-padded, ``model(input_ids, attention_mask,
   labels)``. Both compute the same NLL (checked). Floor: 0.95x.
2. **training**: answer tokens per second of :func:`lorablocks.training.train.train_adapter` versus HF ``Trainer``
   + PEFT with the same model, training examples, batch size, LoRA config (r, alpha, targets), optimizer
   (AdamW, same learning rate, warm-up, linear decay) and number of steps. Floor: 1.0x.
3. **peak memory** (max RSS) of a separate ``lorablocks train`` process on the default model. Floor: < 4 GB.

Each timing is the best of ``--repeats`` runs (the machine may be shared). Ratios > 1 mean lorablocks is faster.
Both sides compute in float32 (``--precision``, default ``fp32``, like for like; bf16 against fp32 is
``bench_precision.py``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lorablocks.training.data import Domain, collate, tokenize_examples
from lorablocks.passes.evaluate import evaluate_perplexity, prepare_eval_set
from lorablocks.model.models import default_targets, load_model
from lorablocks.training.train import TrainConfig, train_adapter


def _hf_eval(model, examples, pad_id: int, batch: int) -> tuple[float, int]:
    """Plain loop: file-order batches, padded, transformers' own loss (mean) times its token count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            b = collate(examples[i : i + batch], pad_id)
            out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels)
            n = int((b.labels[:, 1:] != -100).sum())
            total += float(out.loss) * n
            count += n
    return total, count


def bench_eval(model, tok, domain: Domain, limit: int, max_length: int, batch: int, repeats: int,
               precision: str = "fp32") -> dict:
    examples = domain.load("test", limit)
    es = prepare_eval_set(tok, {"d": examples}, max_length=max_length)
    tokenized = tokenize_examples(tok, examples, max_length).examples
    ours, base = [], []
    for _ in range(repeats):  # alternate, keep the best of each
        t0 = time.perf_counter()
        res = evaluate_perplexity(model, es, precision=precision)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        nll, cnt = _hf_eval(model, tokenized, tok.pad_token_id, batch)
        base.append(time.perf_counter() - t0)
    tokens = res.domains["d"].tokens
    assert cnt == tokens, (cnt, tokens)
    assert math.isclose(nll, res.domains["d"].nll, rel_tol=1e-4 if precision == "fp32" else 5e-3), (nll, res.domains["d"].nll)
    return {
        "examples": len(examples),
        "counted_tokens": tokens,
        "lorablocks_s": min(ours),
        "transformers_loop_s": min(base),
        "lorablocks_tokens_per_s": tokens / min(ours),
        "transformers_tokens_per_s": tokens / min(base),
        "ratio": min(base) / min(ours),
        "floor": 0.95,
    }


def _hf_trainer_run(model, tok, domain: Domain, args, lr: float, warmup: int) -> tuple[float, int]:
    """HF Trainer + PEFT on the same examples; returns (training-loop seconds, answer tokens seen)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    examples = tokenize_examples(tok, domain.load("train", args.train_limit), args.max_length).examples
    rows = [{"input_ids": list(e.input_ids), "n_prompt": e.n_prompt} for e in examples]
    seen = {"tokens": 0}

    def collator(batch):
        from lorablocks.training.data import TokenizedExample

        b = collate([TokenizedExample(tuple(r["input_ids"]), r["n_prompt"]) for r in batch], tok.pad_token_id)
        seen["tokens"] += int((b.labels[:, 1:] != -100).sum())
        return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels}

    timer = {}

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            timer["t0"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            timer["t1"] = time.perf_counter()

    lora = LoraConfig(r=4, lora_alpha=64, lora_dropout=0.0, target_modules=default_targets(model), bias="none",
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(copy.deepcopy(model), lora)
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args.batch_size, max_steps=args.steps, learning_rate=lr,
            warmup_steps=warmup, lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0,
            logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
            remove_unused_columns=False, disable_tqdm=True, seed=0,
        )
        trainer = Trainer(model=peft_model, args=targs, train_dataset=rows, data_collator=collator, callbacks=[Timer()])
        trainer.train()
    return timer["t1"] - timer["t0"], seen["tokens"]


def bench_train(model, tok, domain: Domain, args) -> dict:
    ours, hf = [], []
    cfg_kw = dict(model=args.model, data=[domain.source], batch_size=args.batch_size, max_length=args.max_length,
                  max_steps=args.steps, train_limit=args.train_limit, val_limit=0, checkpoint_every=0,
                  precision=args.precision)
    defaults = TrainConfig()
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            res = train_adapter(TrainConfig(out=str(Path(tmp) / "a"), **cfg_kw), model=model, tokenizer=tok, progress=False)
        rec = res.record
        ours.append((rec["train_seconds"], sum(e["answer_tokens"] for e in rec["loss_curve"])))
        hf.append(_hf_trainer_run(model, tok, domain, args, defaults.learning_rate, defaults.warmup_steps))
    best_ours = max(t / s for s, t in ours)
    best_hf = max(t / s for s, t in hf)
    return {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lorablocks_answer_tokens_per_s": best_ours,
        "hf_trainer_answer_tokens_per_s": best_hf,
        "lorablocks_runs": ours,
        "hf_trainer_runs": hf,
        "ratio": best_ours / best_hf,
        "floor": 1.0,
    }


def bench_memory(args) -> dict:
    """Peak resident memory of a fresh training process, read from its own ``VmHWM`` (a forked child's
    ``ru_maxrss`` would include the parent's memory from before ``exec``)."""
    code = (
        "import sys, torch; torch.set_num_threads(%d)\n"
        "from lorablocks.training.train import TrainConfig, train_adapter\n"
        "train_adapter(TrainConfig(model=%r, data=[%r], out=sys.argv[1], batch_size=%d, max_length=%d, max_steps=%d,"
        " train_limit=%d, val_limit=16, checkpoint_every=0, precision=%r), progress=False)\n"
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n"
    ) % (args.threads, args.model, args.data, args.batch_size, args.max_length, min(args.steps, 3), args.train_limit,
         args.precision)
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-c", code, str(Path(tmp) / "a")], check=True, capture_output=True, text=True)
    peak_kb = int(proc.stdout.strip().splitlines()[-1])
    return {"peak_rss_gb": peak_kb / 1024**2, "floor_gb": 4.0, "max_length": args.max_length, "batch_size": args.batch_size,
            "micro_batch_tokens": TrainConfig().micro_batch_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "math"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--train-limit", type=int, default=256)
    ap.add_argument("--eval-limit", type=int, default=48)
    ap.add_argument("--eval-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"],
                    help="lorablocks' training and evaluation precision (HF Trainer runs in fp32)")
    ap.add_argument("--parts", default="eval,train,memory", help="comma-separated subset of eval,train,memory")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    domain = Domain("bench", args.data, "folder")
    results = {"args": vars(args), "torch_threads": torch.get_num_threads()}
    if "memory" in parts:
        results["memory"] = bench_memory(args)
        m = results["memory"]
        print(f"memory: peak RSS of training {m['peak_rss_gb']:.2f} GB (floor < 4 GB; batch {args.batch_size} x "
              f"{args.max_length} tokens, micro-batches of {m['micro_batch_tokens']} tokens)", flush=True)
    if parts <= {"memory"}:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return
    model, tok = load_model(args.model)
    if "eval" in parts:
        results["eval"] = bench_eval(model, tok, domain, args.eval_limit, 512, args.eval_batch, args.repeats,
                                     args.precision)
        e = results["eval"]
        print(f"eval:   lorablocks {e['lorablocks_tokens_per_s']:.0f} tok/s vs transformers loop "
              f"{e['transformers_tokens_per_s']:.0f} tok/s -> {e['ratio']:.2f}x (floor 0.95x)", flush=True)
    if "train" in parts:
        results["train"] = bench_train(model, tok, domain, args)
        t = results["train"]
        print(f"train:  lorablocks {t['lorablocks_answer_tokens_per_s']:.0f} answer tok/s vs HF Trainer+PEFT "
              f"{t['hf_trainer_answer_tokens_per_s']:.0f} -> {t['ratio']:.2f}x (floor 1.0x)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
