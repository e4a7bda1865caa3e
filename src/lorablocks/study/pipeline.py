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
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lorablocks.core import algebra
from lorablocks.errors import ConfigError, LoraBlocksError
from lorablocks.files.outputs import versions, write_json
from lorablocks.training.train import TrainConfig

__all__ = [
    "LoraSettings",
    "TrainSettings",
    "EvalSettings",
    "StudyConfig",
    "PRESETS",
    "load_config",
    "plan_subsets",
    "run_study",
    "StudyResult",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_T = TrainConfig()  # the training defaults (chosen on validation loss) are the study's defaults too


class LoraSettings(_Strict):
    """LoRA of every adapter in the study (the paper: rank 4, alpha 64)."""

    r: int = Field(_T.r, ge=1, description="LoRA rank.")
    alpha: float = Field(_T.alpha, gt=0, description="LoRA alpha; the scale is alpha / r.")
    dropout: float = Field(_T.dropout, ge=0, lt=1, description="LoRA dropout during training.")
    targets: list[str] | None = Field(None, description="Target modules; default: the model family's preset.")


class TrainSettings(_Strict):
    """Training of each block; a merged-data adapter gets ``steps_per_domain`` per domain of its subset."""

    steps_per_domain: int = Field(_T.max_steps, ge=1, description="Optimizer steps per domain.")
    learning_rate: float = Field(_T.learning_rate, gt=0, description="Peak learning rate (AdamW).")
    warmup_steps: int = Field(_T.warmup_steps, ge=0, description="Linear warm-up steps (at most half the run).")
    batch_size: int = Field(_T.batch_size, ge=1, description="Examples per optimizer step.")
    max_length: int = Field(_T.max_length, ge=16, description="Tokens per example; longer examples are truncated (counted).")
    train_limit: int | None = Field(None, ge=1, description="Use only the first N training examples per domain.")
    val_limit: int = Field(50, ge=0, description="Validation examples per domain for the start/end validation loss.")
    checkpoint_every: int = Field(_T.checkpoint_every, ge=0, description="Checkpoint every N steps (resume mid-block).")


class EvalSettings(_Strict):
    """Held-out evaluation."""

    split: Literal["test", "validation"] = Field("test", description="Split to evaluate on.")
    limit: int | None = Field(200, ge=1, description="Examples per domain (first N, deterministic); null: all.")
    max_length: int = Field(512, ge=16, description="Tokens per example; longer ones are truncated (counted).")


SubsetSpec = Union[Literal["pairs_and_all", "pairs", "all", "none"], list[list[str]]]


class StudyConfig(_Strict):
    """Everything the study depends on. YAML is only a serialisation of this."""

    model: str = Field("smollm2-135m", description="Base model: built-in name, local folder or hub id.")
    domains: list[str] = Field(["math", "medicine", "finance"], description="Domain folders (names under --data, or paths).")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    merged_subsets: SubsetSpec = Field("pairs_and_all", description="Subsets that get a merged-data adapter.")
    max_sum_size: int | None = Field(None, ge=2, description="Largest sum evaluated (default: all domains).")
    seeds: list[int] = Field([0], min_length=1, description="Training seeds; results report mean and spread.")

    @field_validator("domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        if len(v) < 2:
            raise ValueError("the study needs at least two domains")
        if len(set(v)) != len(v):
            raise ValueError("domains must be distinct")
        return v


PRESETS: dict[str, dict[str, Any]] = {
    # The whole pipeline in minutes, for checking (numbers are not meaningful).
    "smoke": {
        "domains": ["math", "medicine", "finance"],
        "train": {"steps_per_domain": 3, "batch_size": 4, "max_length": 96, "train_limit": 64, "val_limit": 4},
        "eval": {"limit": 8, "max_length": 128},
        "seeds": [0],
    },
    # The README's main command: numbers worth reading in under 20 minutes on 2 CPU cores.
    "quick": {
        "domains": ["math", "medicine", "finance"],
        "train": {"steps_per_domain": 8, "batch_size": 8, "max_length": 128, "val_limit": 8},
        "eval": {"limit": 20, "max_length": 192},
        "seeds": [0],
    },
    # The full run: the paper's three seeds, longer training, larger held-out sets.
    "paper": {
        "domains": ["math", "medicine", "finance"],
        "train": {"steps_per_domain": 300, "batch_size": 8, "max_length": 256},
        "eval": {"limit": 500, "max_length": 512},
        "seeds": [0, 1, 2],
    },
}


def _deep_update(base: dict, new: dict) -> dict:
    out = dict(base)
    for k, v in new.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | os.PathLike | None = None, preset: str | None = None,
                overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Preset, then YAML file, then overrides; every problem is reported at once as a :class:`ConfigError`."""
    import yaml

    raw: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        raw = _deep_update(raw, PRESETS[preset])
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of settings")
        raw = _deep_update(raw, loaded)
    raw = _deep_update(raw, overrides or {})
    try:
        cfg = StudyConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"{len(problems)} problem(s) in the study config: " + "; ".join(problems))
    problems = []
    if isinstance(cfg.merged_subsets, list):
        for s in cfg.merged_subsets:
            unknown = [d for d in s if d not in cfg.domains]
            if unknown:
                problems.append(f"merged_subsets: {unknown} not among domains {cfg.domains}")
            if len(s) < 2:
                problems.append(f"merged_subsets: {s} has fewer than two domains")
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in the study config: " + "; ".join(problems))
    return cfg


def plan_subsets(domains: Sequence[str], max_size: int | None, merged: SubsetSpec) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """All subsets of size 2..max_size (the sums), and the subsets that get a merged-data adapter."""
    n = len(domains)
    top = n if max_size is None else min(max_size, n)
    sums = [s for k in range(2, top + 1) for s in itertools.combinations(domains, k)]
    if merged == "pairs_and_all":
        merged_sets = [s for s in sums if len(s) == 2] + ([tuple(domains)] if n > 2 else [])
    elif merged == "pairs":
        merged_sets = [s for s in sums if len(s) == 2]
    elif merged == "all":
        merged_sets = [tuple(domains)]
    elif merged == "none":
        merged_sets = []
    else:
        merged_sets = [tuple(d for d in domains if d in s) for s in merged]
    return sums, merged_sets


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
    tc = TrainConfig(
        model=config.model,
        data=[d.source for d in domains],
        out=str(out),
        r=config.lora.r,
        alpha=config.lora.alpha,
        dropout=config.lora.dropout,
        targets=config.lora.targets,
        max_steps=config.train.steps_per_domain * len(domains),
        learning_rate=config.train.learning_rate,
        warmup_steps=min(config.train.warmup_steps, config.train.steps_per_domain * len(domains) // 2),
        batch_size=config.train.batch_size,
        max_length=config.train.max_length,
        train_limit=config.train.train_limit,
        val_limit=config.train.val_limit,
        eval_every=0,
        seed=seed,
        checkpoint_dir=str(ckpt),
        checkpoint_every=config.train.checkpoint_every,
        resume=ckpt.is_dir() and any(ckpt.iterdir()),
        force=True,
        cache_dir=str(cache_dir) if cache_dir else None,
    )
    train_adapter(tc, model=model, tokenizer=tokenizer)
