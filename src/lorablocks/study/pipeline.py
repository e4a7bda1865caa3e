"""The experiment of arXiv 2508.11985 end to end: train blocks, sum them, measure overlap and interference.

Stages (BRIEF, "The study"), per seed:

1. one adapter per domain (its train split);
2. a merged-data adapter per configured subset (the union of its train splits, domains balanced, the same
   number of optimizer steps per domain, so ``|S| * steps_per_domain`` in all);
3. every sum of two or more single adapters (exact, factored);
4. per-domain and joint perplexity of the base model, singles, sums, merged-data adapters and unlearned
   sums (the sum of all minus one), all on the held-out split;
5. overlap (RMS and signed mean cosine of the deltas), the fit of change-vs-merged against RMS cosine,
   degradation against the number of blocks, and unlearning.

Every trained adapter and every evaluation is cached under ``OUT/cache`` by a fingerprint of everything it
depends on (model, data files, settings, seed, and for evaluations the exact recipe of the combination),
and written atomically. A study killed at any moment and run again reuses what was finished; changing a
setting redoes only what depends on it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorablocks.core import algebra
from lorablocks.errors import LoraBlocksError
from lorablocks.files.outputs import versions, write_json
from lorablocks.study.config import StudyConfig, load_config, plan_subsets  # noqa: F401  (load_config: imported from here before)

__all__ = ["run_study", "StudyResult"]


# ----------------------------------------------------------------------------------------------- caching


def fingerprint(obj: Any) -> str:
    """SHA-256 of a canonical JSON form of ``obj``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _tag(subset: Sequence[str]) -> str:
    return "+".join(subset)


@dataclass
class StudyResult:
    """Everything the report needs (see :func:`lorablocks.study.report.write_report`)."""

    config: dict[str, Any]
    domains: list[str]
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    subsets: list[dict[str, Any]] = field(default_factory=list)
    overlap: dict[str, Any] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)
    degradation: list[dict[str, Any]] = field(default_factory=list)
    unlearning: list[dict[str, Any]] = field(default_factory=list)
    training: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


Progress = Callable[[str], None]


def run_study(
    config: StudyConfig,
    data_root: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    log: Progress = print,
    threads: int | None = None,
) -> StudyResult:
    """Run (or resume) the study into ``out``; returns the results that the report is made from.

    ``out`` may already hold an earlier run of the study (its ``cache`` is reused); any other non-empty
    folder is refused unless ``force``.
    """
    import torch

    from lorablocks.training.data import resolve_domains
    from lorablocks.training.evaluate import evaluate_perplexity, prepare_eval_set
    from lorablocks.model.models import load_model, model_id

    out = Path(out)
    marker = out / "study.json"
    if out.exists() and any(out.iterdir()) and not marker.exists() and not force:
        raise LoraBlocksError(f"{out} exists and is not a lorablocks study folder; choose another --out or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        write_json(marker, {"tool": "lorablocks", "kind": "study"})
    cache = out / "cache"
    (cache / "adapters").mkdir(parents=True, exist_ok=True)
    (cache / "evals").mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else None  # one model serves training and evaluation

    t_start = time.perf_counter()
    specs = [_domain_path(d, data_root) for d in config.domains]
    domains = resolve_domains(specs)
    names = [d.name for d in domains]
    by_name = dict(zip(config.domains, domains))
    sums, merged_sets = plan_subsets(config.domains, config.max_sum_size, config.merged_subsets)
    data_prints = {d: {s: by_name[d].fingerprint(s) for s in ("train", "validation", config.eval.split)}
                   for d in config.domains}
    result = StudyResult(config=config.model_dump(), domains=list(config.domains), versions=versions())

    # ---- stage 1+2: training -----------------------------------------------------------------------
    jobs: list[tuple[int, tuple[str, ...]]] = []
    for seed in config.seeds:
        jobs += [(seed, (d,)) for d in config.domains]
        jobs += [(seed, s) for s in merged_sets]
    adapter_dirs: dict[tuple[int, tuple[str, ...]], Path] = {}
    todo = []
    for seed, subset in jobs:
        key = {"model": model_id(config.model), "subset": list(subset), "data": {d: data_prints[d]["train"] for d in subset},
               "val": {d: data_prints[d]["validation"] for d in subset}, "lora": config.lora.model_dump(),
               "train": config.train.model_dump(), "seed": seed, "format": 1}
        path = cache / "adapters" / f"{_tag(subset)}-seed{seed}-{fingerprint(key)[:12]}"
        adapter_dirs[(seed, subset)] = path
        if not (path / "adapter_model.safetensors").is_file():
            todo.append((seed, subset, path))
    total_steps = sum(config.train.steps_per_domain * len(s) for _, s, _ in todo)
    log(f"training: {len(jobs) - len(todo)} of {len(jobs)} adapters cached, {len(todo)} to train "
        f"({total_steps} optimizer steps)")
    t0 = time.perf_counter()
    done_steps = 0
    model = tokenizer = None
    for i, (seed, subset, path) in enumerate(todo):
        eta = ""
        if done_steps:
            rate = (time.perf_counter() - t0) / done_steps
            eta = f", about {rate * (total_steps - done_steps) / 60:.1f} min of training left"
        kind = "single" if len(subset) == 1 else "merged-data"
        log(f"[{i + 1}/{len(todo)}] training {kind} adapter {_tag(subset)} (seed {seed}){eta}")
        if model is None:
            model, tokenizer = load_model(config.model, cache_dir=cache_dir, device=device)
        _train_block(config, [by_name[d] for d in subset], seed, path, cache_dir, model, tokenizer)
        done_steps += config.train.steps_per_domain * len(subset)
    result.timings["training_s"] = time.perf_counter() - t0
    for (seed, subset), path in adapter_dirs.items():
        rec_path = path / "lorablocks_train.json"
        rec = json.loads(rec_path.read_text()) if rec_path.is_file() else {}
        result.training.append({"seed": seed, "subset": list(subset), "path": str(path),
                                "loss_curve": rec.get("loss_curve", []), "validation": rec.get("validation", []),
                                "seconds": rec.get("train_seconds", 0.0) + rec.get("validation_seconds", 0.0)})
    result.timings["training_compute_s"] = sum(t["seconds"] for t in result.training)

    # ---- stage 3+4: evaluation ------------------------------------------------------------------------
    from lorablocks.files.adapters import load_adapter

    loaded = {k: load_adapter(p) for k, p in adapter_dirs.items()}
    deltas = {k: a.delta for k, a in loaded.items()}
    adapter_prints = {k: a.sha256 for k, a in loaded.items()}

    evals: list[tuple[str, str, int | None, tuple[str, ...], list[tuple[tuple, float]]]] = [("base", "base", None, (), [])]
    for seed in config.seeds:
        for d in config.domains:
            evals.append((f"single:{d}", "single", seed, (d,), [((seed, (d,)), 1.0)]))
        for s in sums:
            evals.append((f"sum:{_tag(s)}", "sum", seed, s, [((seed, (d,)), 1.0) for d in s]))
        for s in merged_sets:
            evals.append((f"merged:{_tag(s)}", "merged", seed, s, [((seed, s), 1.0)]))
        for d in config.domains:
            recipe = [((seed, (e,)), 1.0) for e in config.domains] + [((seed, (d,)), -1.0)]
            evals.append((f"unlearn:{d}", "unlearn", seed, (d,), recipe))

    eval_key_base = {"model": model_id(config.model), "eval": config.eval.model_dump(),
                     "data": {d: data_prints[d][config.eval.split] for d in config.domains}, "format": 1}
    pending = []
    cached: dict[tuple[str, int | None], dict] = {}
    for label, kind, seed, subset, recipe in evals:
        key = {**eval_key_base, "recipe": [[adapter_prints[k], w] for k, w in recipe]}
        path = cache / "evals" / f"{label.replace(':', '-')}-seed{seed}-{fingerprint(key)[:12]}.json"
        if path.is_file():
            cached[(label, seed)] = json.loads(path.read_text())
        else:
            pending.append((label, kind, seed, subset, recipe, path))
    log(f"evaluation: {len(cached)} of {len(evals)} cached, {len(pending)} to run "
        f"({len(config.domains)} domains x {config.eval.limit or 'all'} {config.eval.split} examples each)")
    t0 = time.perf_counter()
    if pending:
        if model is None:
            model, tokenizer = load_model(config.model, cache_dir=cache_dir, device=device)
        eval_set = prepare_eval_set(tokenizer, domains, split=config.eval.split, limit=config.eval.limit,
                                    max_length=config.eval.max_length)
        for i, (label, kind, seed, subset, recipe, path) in enumerate(pending):
            eta = ""
            if i:
                eta = f", about {(time.perf_counter() - t0) / i * (len(pending) - i) / 60:.1f} min of evaluation left"
            log(f"[{i + 1}/{len(pending)}] evaluating {label} (seed {seed}){eta}")
            delta = algebra.add([deltas[k] for k, _ in recipe], [w for _, w in recipe]) if recipe else None
            t_eval = time.perf_counter()
            res = evaluate_perplexity(model, eval_set, delta)
            rec = {"label": label, "kind": kind, "seed": seed, "subset": list(subset),
                   "seconds": time.perf_counter() - t_eval,
                   "domains": {n: s.to_dict() for n, s in res.domains.items()},
                   "per_example": {n: [list(r) for r in rows] for n, rows in res.per_example.items()}}
            write_json(path, rec, force=True)
            cached[(label, seed)] = rec
    result.timings["evaluation_s"] = time.perf_counter() - t0

    # map domain display names (folder names) to config names
    rename = dict(zip(names, config.domains))
    for rec in cached.values():
        rec["domains"] = {rename.get(n, n): v for n, v in rec["domains"].items()}
        rec["per_example"] = {rename.get(n, n): v for n, v in rec["per_example"].items()}
    result.evaluations = [{k: v for k, v in rec.items() if k != "per_example"} for rec in cached.values()]
    result.timings["evaluation_compute_s"] = sum(rec.get("seconds", 0.0) for rec in cached.values())

    # ---- stage 5: analysis ----------------------------------------------------------------------------
    from lorablocks.study.analysis import analyse

    analyse(result, cached, deltas, sums, merged_sets, config)
    result.timings["total_s"] = time.perf_counter() - t_start
    return result


def _domain_path(spec: str, data_root: str | os.PathLike | None) -> str:
    if data_root is not None and not os.path.isabs(spec) and (Path(data_root) / spec).exists():
        return str(Path(data_root) / spec)
    return spec


def _train_block(config: StudyConfig, domains: list, seed: int, out: Path, cache_dir, model, tokenizer) -> None:
    """Train one block (a single domain or the merged data of a subset) into ``out``, resumable."""
    from lorablocks.training.train import TrainConfig, train_adapter

    ckpt = out.parent / f".ckpt-{out.name}"
    steps = config.train.steps_per_domain * len(domains)
    tc = TrainConfig(
        **config.lora.model_dump(),
        **config.train.model_dump(exclude={"steps_per_domain", "warmup_steps"}),
        warmup_steps=min(config.train.warmup_steps, steps // 2),
        max_steps=steps,
        seed=seed,
        eval_every=0,  # validation loss at the start and end of each block only
        model=config.model,
        data=[d.source for d in domains],
        out=str(out),
        checkpoint_dir=str(ckpt),
        resume=ckpt.is_dir() and any(ckpt.iterdir()),
        force=True,
        cache_dir=str(cache_dir) if cache_dir else None,
    )
    train_adapter(tc, model=model, tokenizer=tokenizer)
