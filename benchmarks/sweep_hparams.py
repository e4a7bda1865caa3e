"""Learning-rate sweep on validation loss for the default model (the evidence behind TrainConfig's defaults).

    .venv/bin/python benchmarks/sweep_hparams.py --data ../shared/data/math --steps 60 --lrs 1e-4,3e-4,1e-3,3e-3

Each run trains a fresh adapter with the given settings (rank 4, alpha 64, the paper targets) and records
the validation loss (first ``--val-limit`` validation examples) every ``--eval-every`` steps. Prints one
table row per learning rate and writes all curves to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lorablocks.model.models import load_model
from lorablocks.training.train import TrainConfig, train_adapter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", nargs="+", default=["../shared/data/math"])
    ap.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--val-limit", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="sweep.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    rows = []
    for lr in [float(x) for x in args.lrs.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(
                model=args.model, data=list(args.data), out=str(Path(tmp) / "a"), learning_rate=lr,
                max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                eval_every=args.eval_every, val_limit=args.val_limit, checkpoint_every=0,
            )
            t0 = time.perf_counter()
            res = train_adapter(cfg, model=model, tokenizer=tok, progress=False)
            secs = time.perf_counter() - t0
        val = [(v["step"], round(v["loss"], 4)) for v in res.validation]
        rows.append({"lr": lr, "validation": val, "seconds": secs, "train_loss_last10": sum(e["loss"] for e in res.record["loss_curve"][-10:]) / 10})
        print(f"lr {lr:g}: validation {val}  ({secs:.0f} s)", flush=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
