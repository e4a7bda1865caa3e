"""The study's stages, each cached under ``OUT/cache`` by a fingerprint of everything it depends on.

* :func:`train_stage`: one adapter per domain and one merged-data adapter per configured subset, per seed
  (resumable mid-block from safetensors checkpoints); a cached adapter that no longer loads is retrained.
* :func:`expose_adapters`: the trained adapters as ``OUT/adapters/<name>`` (``-seedN`` with several seeds),
  ready for ``combine``, ``eval`` and ``serve``.
* :func:`evaluation_stage`: per-domain perplexity of every combination on the domains it needs, with each
  example's answer NLL and token count kept for the intervals; a corrupt cached record is recomputed.
* :func:`probe_stage`: function overlap of the single blocks on the base model (per seed).
* :func:`learned_stage`: the ``learned`` method's per-layer weights for each subset.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorablocks.compose.recipe import Block, Recipe, make_recipe
from lorablocks.errors import LoraBlocksError
from lorablocks.files.outputs import write_json
from lorablocks.study.config import StudyConfig

__all__ = ["fingerprint", "tag", "StudyContext", "BlockKey", "Trained", "EvalJob", "train_stage",
           "statistics_stage", "expose_adapters", "evaluation_stage", "probe_stage", "learned_stage"]

Log = Callable[[str], None]
#: ``(seed, subset)``: a single block has a one-domain subset, a merged-data block several
BlockKey = tuple[int, tuple[str, ...]]


def fingerprint(obj: Any) -> str:
    """SHA-256 of a canonical JSON form of ``obj``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tag(subset: Sequence[str]) -> str:
    return "+".join(subset)


@dataclass
class StudyContext:
    """What every stage needs: the config, where things go, the domains, and the model (loaded once)."""

    config: StudyConfig
    out: Path
    domains: dict[str, Any]  # config name -> lorablocks.training.data.Domain
    data_prints: dict[str, dict[str, str]]
    model_id: str
    log: Log
    cache_dir: str | os.PathLike | None = None
    device: str | None = None
    _session: Any = None

    @property
    def cache(self) -> Path:
        return self.out / "cache"

    def session(self):
        """The base model as a :class:`~lorablocks.model.session.ComposedModel`, loaded on first use."""
        if self._session is None:
            from lorablocks.model.session import ComposedModel

            self._session = ComposedModel.load(self.config.model, cache_dir=self.cache_dir, device=self.device)
        return self._session


def _read_json(path: Path, log: Log) -> dict | None:
    """A cached JSON record, or None (a corrupt one is named, removed and recomputed)."""
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
        if isinstance(rec, dict):
            return rec
    except (OSError, ValueError):
        pass
    log(f"cached record {path} is corrupt: recomputing it")
    path.unlink(missing_ok=True)
    return None


# ------------------------------------------------------------------------------------------- training


@dataclass
class Trained:
    """The trained blocks: their folders, content fingerprints, loaded deltas and training records."""

    paths: dict[BlockKey, Path] = field(default_factory=dict)
    sha256: dict[BlockKey, str] = field(default_factory=dict)
    deltas: dict[BlockKey, dict] = field(default_factory=dict)
    records: dict[BlockKey, dict] = field(default_factory=dict)
    #: each block's input statistics (written by training, or collected by :func:`statistics_stage`)
    statistics: dict[BlockKey, Any] = field(default_factory=dict)
    seconds: float = 0.0


def _block_path(ctx: StudyContext, seed: int, subset: tuple[str, ...]) -> Path:
    train = ctx.config.train
    key = {"model": ctx.model_id, "subset": list(subset), "data": {d: ctx.data_prints[d]["train"] for d in subset},
           "val": {d: ctx.data_prints[d]["validation"] for d in subset}, "lora": ctx.config.lora.model_dump(),
           "train": train.model_dump(exclude={"merged_updates"}), "seed": seed, "format": 1}
    if len(subset) > 1 and train.merged_updates != "per_domain":  # the default keeps the keys of earlier runs
        key["merged_updates"] = train.merged_updates
    return ctx.cache / "adapters" / f"{tag(subset)}-seed{seed}-{fingerprint(key)[:12]}"


def _load_cached(path: Path, log: Log):
    """The cached adapter at ``path``, or None if it is missing or no longer loads (then it is removed)."""
    from lorablocks.files.adapters import load_adapter

    if not (path / "adapter_model.safetensors").is_file():
        return None
    try:
        return load_adapter(path)
    except LoraBlocksError as exc:
        log(f"cached adapter {path} is unusable ({exc}): training it again")
        shutil.rmtree(path, ignore_errors=True)
        return None


def _train_block(ctx: StudyContext, subset: tuple[str, ...], seed: int, out: Path) -> None:
    """Train one block (a single domain or the merged data of a subset) into ``out``, resumable."""
    from lorablocks.training.train import TrainConfig, train_adapter

    cfg = ctx.config
    ckpt = out.parent / f".ckpt-{out.name}"
    steps, batch = cfg.train.block_steps(len(subset))
    tc = TrainConfig(
        **cfg.lora.model_dump(), **cfg.train.model_dump(exclude={"steps_per_domain", "warmup_steps", "merged_updates",
                                                                 "batch_size"}),
        batch_size=batch, warmup_steps=min(cfg.train.warmup_steps, steps // 2), max_steps=steps, seed=seed, eval_every=0,
        model=cfg.model, data=[ctx.domains[d].source for d in subset], out=str(out), checkpoint_dir=str(ckpt),
        resume=ckpt.is_dir() and any(ckpt.iterdir()), force=True, statistics=len(subset) == 1,  # singles compose
        cache_dir=str(ctx.cache_dir) if ctx.cache_dir else None)
    session = ctx.session()
    train_adapter(tc, model=session.model, tokenizer=session.tokenizer)


def train_stage(ctx: StudyContext, merged_sets: Sequence[tuple[str, ...]]) -> Trained:
    """Every block of every seed, trained or read from the cache."""
    cfg = ctx.config
    keys = [(s, (d,)) for s in cfg.seeds for d in cfg.domains] + [(s, m) for s in cfg.seeds for m in merged_sets]
    trained = Trained(paths={k: _block_path(ctx, *k) for k in keys})
    loaded = {k: _load_cached(p, ctx.log) for k, p in trained.paths.items()}
    todo = [k for k in keys if loaded[k] is None]
    total = sum(cfg.train.block_steps(len(k[1]))[0] for k in todo)
    ctx.log(f"training: {len(keys) - len(todo)} of {len(keys)} adapters cached, {len(todo)} to train ({total} optimizer steps)")
    t0, done = time.perf_counter(), 0
    for i, (seed, subset) in enumerate(todo):
        eta = f", about {(time.perf_counter() - t0) / done * (total - done) / 60:.1f} min of training left" if done else ""
        kind = "single" if len(subset) == 1 else "merged-data"
        ctx.log(f"[{i + 1}/{len(todo)}] training {kind} adapter {tag(subset)} (seed {seed}){eta}")
        _train_block(ctx, subset, seed, trained.paths[(seed, subset)])
        loaded[(seed, subset)] = _load_cached(trained.paths[(seed, subset)], ctx.log)
        done += cfg.train.block_steps(len(subset))[0]
    trained.seconds = time.perf_counter() - t0
    for k, a in loaded.items():
        if a is None:
            raise LoraBlocksError(f"the adapter for {tag(k[1])} (seed {k[0]}) could not be trained")
        trained.sha256[k], trained.deltas[k] = a.sha256, a.delta
        trained.records[k] = _read_json(trained.paths[k] / "lorablocks_train.json", ctx.log) or {}
    return trained


def statistics_stage(ctx: StudyContext, trained: Trained) -> None:
    """Each single block's input statistics: those its training wrote, else collected now on its own training
    inputs (the first examples of its train split, as training does) and stored beside the cached block."""
    from lorablocks.files.statistics import STATS_NAME, statistics_beside, write_statistics
    from lorablocks.passes.statistics import StatsSettings, block_statistics

    for key, path in trained.paths.items():
        stats = statistics_beside(path)
        if stats is None and len(key[1]) == 1:
            ctx.log(f"collecting input statistics of {tag(key[1])} (seed {key[0]}) on its training inputs")
            session = ctx.session()
            settings = StatsSettings(split="train", limit=ctx.config.train.train_limit,
                                     max_length=ctx.config.train.max_length)
            with session.composed(trained.deltas[key]):
                got = block_statistics(session.model, session.tokenizer, list(trained.deltas[key]),
                                       ctx.domains[key[1][0]], settings, ctx.model_id, trained.sha256[key])
            stats = write_statistics(path / STATS_NAME, got.grams, got.modules, ctx.model_id, got.data)
        trained.statistics[key] = stats


def expose_adapters(ctx: StudyContext, trained: Trained) -> dict[str, Path]:
    """Copy each trained adapter to ``OUT/adapters/<name>`` (``-seedN`` with several seeds); returns the names."""
    from lorablocks.files.outputs import atomic_dir, output_kind, sha256_file

    several = len(ctx.config.seeds) > 1
    folder = ctx.out / "adapters"
    folder.mkdir(exist_ok=True)
    exposed = {}
    for (seed, subset), src in trained.paths.items():
        name = ("merged-" if len(subset) > 1 else "") + tag(subset) + (f"-seed{seed}" if several else "")
        dest = folder / name
        weights = dest / "adapter_model.safetensors"
        if weights.is_file() and output_kind(dest) and sha256_file(weights) == trained.sha256[(seed, subset)]:
            exposed[name] = dest  # already there: the cached block's hash is known, only the copy is read
            continue
        with atomic_dir(dest, force=dest.exists(), kind="adapter") as tmp:
            for f in src.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        exposed[name] = dest
    return exposed


# ----------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class EvalJob:
    """One combination to score: its label, kind, seed, subset, the domains it is scored on, and its recipe
    (None: the base model). ``blocks`` are the trained blocks behind the recipe's blocks, in order."""

    label: str
    kind: str
    seed: int | None
    subset: tuple[str, ...]
    domains: tuple[str, ...]
    recipe: Recipe | None
    blocks: tuple[BlockKey, ...] = ()


def recipe_of(trained: Trained, keys: Sequence[BlockKey], weights: Sequence[float], method: str = "sum",
              params: dict | None = None) -> Recipe:
    """A recipe over trained blocks (fingerprinted by their content, and their statistics' for regmean)."""
    from lorablocks.compose.methods import get_method

    stats = get_method(method).needs_statistics
    blocks = [Block(name=tag(k[1]), weight=w, sha256=trained.sha256[k],
                    statistics_sha256=trained.statistics[k].sha256 if stats and trained.statistics.get(k) else None)
              for k, w in zip(keys, weights)]
    return make_recipe(blocks, method=method, params=params, rank="concat")


def _eval_path(ctx: StudyContext, job: EvalJob) -> Path:
    key = {"model": ctx.model_id, "eval": ctx.config.eval.model_dump(), "domains": list(job.domains),
           "data": {d: ctx.data_prints[d][ctx.config.eval.split] for d in job.domains},
           "recipe": job.recipe.fingerprint() if job.recipe else None, "format": 2}
    name = job.label.replace(":", "-").replace("/", "_")
    return ctx.cache / "evals" / f"{name}-seed{job.seed}-{fingerprint(key)[:12]}.json"


def _score(ctx: StudyContext, job: EvalJob, trained: Trained, eval_set) -> dict:
    from lorablocks.compose.recipe import compose
    from lorablocks.passes.evaluate import EvalSet, evaluate_perplexity

    session = ctx.session()
    names = [ctx.domains[d].name for d in job.domains]
    sub = EvalSet(sets={n: eval_set.sets[n] for n in names}, split=eval_set.split, batch_tokens=eval_set.batch_tokens,
                  pad_id=eval_set.pad_id, fingerprints=eval_set.fingerprints, plans={n: eval_set.plans[n] for n in names})
    stats = [trained.statistics.get(k) for k in job.blocks] if job.recipe and job.recipe.method == "regmean" else None
    delta = compose(job.recipe, [trained.deltas[k] for k in job.blocks], statistics=stats).delta if job.recipe else None
    t0 = time.perf_counter()
    with session.composed(delta, job.recipe):
        res = evaluate_perplexity(session.model, sub, precision=ctx.config.eval.precision)
    back = dict(zip(names, job.domains))
    return {"label": job.label, "kind": job.kind, "seed": job.seed, "subset": list(job.subset),
            "recipe": job.recipe.fingerprint() if job.recipe else None, "seconds": time.perf_counter() - t0,
            "domains": {back[n]: s.to_dict() for n, s in res.domains.items()},
            "per_example": {back[n]: [list(r) for r in rows] for n, rows in res.per_example.items()}}


def evaluation_stage(ctx: StudyContext, jobs: Sequence[EvalJob], trained: Trained) -> dict[tuple[str, int | None], dict]:
    """Every job's record (domains' scores and per-example NLLs), from the cache or scored now."""
    from lorablocks.passes.evaluate import prepare_eval_set

    records: dict[tuple[str, int | None], dict] = {}
    pending = []
    for job in jobs:
        rec = _read_json(_eval_path(ctx, job), ctx.log)
        if rec is not None:
            records[(job.label, job.seed)] = rec
        else:
            pending.append(job)
    n_ex = sum(len(j.domains) for j in pending) * (ctx.config.eval.limit or 0)
    ctx.log(f"evaluation: {len(records)} of {len(jobs)} cached, {len(pending)} to run "
            f"(about {n_ex or 'all'} {ctx.config.eval.split} examples in all)")
    if not pending:
        return records
    session = ctx.session()
    eval_set = prepare_eval_set(session.tokenizer, list(ctx.domains.values()), split=ctx.config.eval.split,
                                limit=ctx.config.eval.limit, max_length=ctx.config.eval.max_length)
    t0 = time.perf_counter()
    for i, job in enumerate(pending):
        eta = f", about {(time.perf_counter() - t0) / i * (len(pending) - i) / 60:.1f} min of evaluation left" if i else ""
        ctx.log(f"[{i + 1}/{len(pending)}] evaluating {job.label} (seed {job.seed}) on {', '.join(job.domains)}{eta}")
        rec = _score(ctx, job, trained, eval_set)
        write_json(_eval_path(ctx, job), rec, force=True)
        records[(job.label, job.seed)] = rec
    return records


# --------------------------------------------------------------------------------- probes and fitting


def probe_stage(ctx: StudyContext, trained: Trained) -> dict[int, dict]:
    """Function overlap of the single blocks, per seed: ``{"interference": ..., "cosine": ..., "energy": ...}``
    (domain order of the config), probed on the answer-predicting positions of ``analysis.probe_limit``
    validation examples of each domain."""
    from lorablocks.passes.probe import probe_function_overlap

    limit = ctx.config.analysis.probe_limit
    out: dict[int, dict] = {}
    if not limit:
        return out
    for seed in ctx.config.seeds:
        keys = [(seed, (d,)) for d in ctx.config.domains]
        key = {"model": ctx.model_id, "blocks": [trained.sha256[k] for k in keys], "limit": limit,
               "data": [ctx.data_prints[d]["validation"] for d in ctx.config.domains], "format": 2}

        def probe(keys=keys) -> dict:
            session = ctx.session()
            with session.composed(None):
                fo = probe_function_overlap(session.model, session.tokenizer, [trained.deltas[k] for k in keys],
                                            [ctx.domains[d] for d in ctx.config.domains], limit=limit)
            return {"interference": fo.interference, "cosine": fo.cosine, "energy": fo.energy, "tokens": "answer"}
        out[seed] = _cached(ctx, ctx.cache / "probes" / f"seed{seed}-{fingerprint(key)[:12]}.json", probe,
                            f"probing function overlap (seed {seed}) on {limit} validation examples per domain")
    return out


def _cached(ctx: StudyContext, path: Path, compute: Callable[[], dict], what: str) -> dict:
    """The JSON record at ``path``, or ``compute()`` written there (saying ``what`` it does first)."""
    rec = _read_json(path, ctx.log)
    if rec is None:
        ctx.log(what)
        rec = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, rec, force=True)
    return rec


def learned_stage(ctx: StudyContext, trained: Trained, spec, subset: tuple[str, ...], seed: int) -> tuple[Recipe, dict]:
    """The ``learned`` recipe of ``subset`` (weights fitted on its domains' validation examples) and its fit record."""
    from lorablocks.training.learned import LearnSettings, fit_layer_weights

    keys = [(seed, (d,)) for d in subset]
    template = recipe_of(trained, keys, [1.0] * len(keys), method="learned")
    settings = LearnSettings(**spec.params)
    key = {"recipe": template.fingerprint(), "settings": spec.params, "model": ctx.model_id,
           "data": [ctx.data_prints[d]["validation"] for d in subset], "format": 1}

    def fit() -> dict:
        session = ctx.session()
        with session.composed(None):
            result = fit_layer_weights(session.model, session.tokenizer, template, [trained.deltas[k] for k in keys],
                                       [ctx.domains[d] for d in subset], settings)
        return {"layer_weights": result.layer_weights, **result.record()}
    rec = _cached(ctx, ctx.cache / "learned" / f"{tag(subset)}-seed{seed}-{fingerprint(key)[:12]}.json", fit,
                  f"fitting learned weights for {tag(subset)} (seed {seed})")
    recipe = recipe_of(trained, keys, [1.0] * len(keys), method="learned",
                       params={"layer_weights": rec["layer_weights"]})
    return recipe, rec
