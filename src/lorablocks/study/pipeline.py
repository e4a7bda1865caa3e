"""The experiment of arXiv 2508.11985 end to end: train blocks, sum them, measure overlap and interference.

Stages (BRIEF, "The study"), per seed (each in :mod:`lorablocks.study.stages`, cached by fingerprint):

1. one adapter per domain (its train split);
2. a merged-data adapter per configured subset (the union of its train splits, domains balanced, the same
   number of optimizer steps per domain, so ``|S| * steps_per_domain`` in all);
3. every sum of two or more single adapters (exact, factored), and every configured method beside it
   (``regmean`` with each block's input statistics; unlearning with it is recomposing without the block,
   scored on the block's own domain as ``unlearn-<method label>:<domain>``, e.g. ``unlearn-regmean(alpha=0.9):math``);
4. perplexity on the held-out split: the base model and the singles on every domain; a sum, a method's
   combination and a merged-data adapter on the domains of its subset; the unlearned sums (the sum of all
   minus one) on every domain; each example's NLL is kept for the intervals;
5. function overlap of the single blocks on the base model's inputs;
6. the analysis (:mod:`lorablocks.study.analysis`): changes with paired-bootstrap intervals, overlap, fits
   at two levels with two predictors, degradation, unlearning, methods, near domains.

A study killed at any moment and run again reuses what was finished; changing a setting redoes only what
depends on it. The output folder carries a lorablocks study marker; any other non-empty folder is refused.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from lorablocks.errors import OutputExistsError
from lorablocks.files.outputs import STUDY_MARKER, output_kind, utc_now, versions, write_json
from lorablocks.study.analysis import StudyResult, analyse
from lorablocks.study.config import StudyConfig, load_config, plan_subsets  # noqa: F401  (load_config: imported from here before)
from lorablocks.study.stages import (EvalJob, StudyContext, Trained, evaluation_stage, expose_adapters, learned_stage,
                                     probe_stage, recipe_of, statistics_stage, tag, train_stage)

__all__ = ["run_study", "StudyResult"]

Progress = Callable[[str], None]


def _claim(out: Path) -> None:
    """Make ``out`` a study folder: refuse a file or a non-empty folder that is not a lorablocks study (no
    ``--force`` can change that: a study never writes into a folder it did not make), and mark it."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} is a file, not a study folder")
    if out.is_dir() and any(out.iterdir()) and output_kind(out) != "study":
        raise OutputExistsError(f"{out} holds files and is not a lorablocks study folder (no lorablocks study "
                                "marker); choose another output folder")
    out.mkdir(parents=True, exist_ok=True)
    if output_kind(out) != "study":
        write_json(out / STUDY_MARKER, {"tool": "lorablocks", "kind": "study", "created": utc_now()}, force=True)


def _context(config: StudyConfig, data_root, out: Path, cache_dir, log: Progress) -> StudyContext:
    import torch

    from lorablocks.model.models import model_id
    from lorablocks.training.data import resolve_domains

    specs = [_domain_path(d, data_root) for d in config.domains]
    domains = dict(zip(config.domains, resolve_domains(specs)))
    prints = {d: {s: domains[d].fingerprint(s) for s in ("train", "validation", config.eval.split)}
              for d in config.domains}
    device = "cuda" if torch.cuda.is_available() else None  # one model serves training and evaluation
    return StudyContext(config=config, out=out, domains=domains, data_prints=prints, model_id=model_id(config.model),
                        log=log, cache_dir=cache_dir, device=device)


def plan_jobs(ctx: StudyContext, trained: Trained, sums, merged_sets) -> tuple[list[EvalJob], dict]:
    """Every evaluation of the study (see the module docstring), and the learned fits it needed."""
    cfg = ctx.config
    every = tuple(cfg.domains)
    jobs = [EvalJob("base", "base", None, (), every, None)]
    fits: dict = {}
    for seed in cfg.seeds:
        single = {d: (seed, (d,)) for d in cfg.domains}
        jobs += [EvalJob(f"single:{d}", "single", seed, (d,), every if cfg.eval.singles_on_all else (d,),
                         recipe_of(trained, [k], [1.0]), (k,)) for d, k in single.items()]
        for s in sums:
            keys = tuple(single[d] for d in s)
            jobs.append(EvalJob(f"sum:{tag(s)}", "sum", seed, s, s, recipe_of(trained, keys, [1.0] * len(s)), keys))
            for spec in cfg.methods if len(s) <= (cfg.methods_max_size or len(s)) else ():
                if spec.name == "learned":
                    recipe, fits[(spec.label, s, seed)] = learned_stage(ctx, trained, spec, s, seed)
                else:
                    recipe = recipe_of(trained, keys, [1.0] * len(s), method=spec.name, params=spec.params)
                jobs.append(EvalJob(f"{spec.label}:{tag(s)}", "method", seed, s, s, recipe, keys))
                if spec.name == "regmean" and len(s) == len(every) - 1:  # unlearning d = recomposing without it
                    gone = next(d for d in every if d not in s)
                    jobs.append(EvalJob(f"unlearn-{spec.label}:{gone}", "unlearn-method", seed, (gone,), (gone,),
                                        recipe, keys))
        jobs += [EvalJob(f"merged:{tag(s)}", "merged", seed, s, s, recipe_of(trained, [(seed, s)], [1.0]),
                         ((seed, s),)) for s in merged_sets]
        for d in cfg.domains:
            keys = tuple(single.values()) + (single[d],)
            recipe = recipe_of(trained, keys, [1.0] * len(every) + [-1.0])
            jobs.append(EvalJob(f"unlearn:{d}", "unlearn", seed, (d,), every, recipe, keys))
    return jobs, fits


def run_study(config: StudyConfig, data_root: str | os.PathLike | None, out: str | os.PathLike, *,
              cache_dir: str | os.PathLike | None = None, log: Progress = print,
              threads: int | None = None) -> StudyResult:
    """Run (or resume) the study into ``out``; returns the results the report is made from."""
    import torch

    out = Path(out)
    _claim(out)
    if threads:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    ctx = _context(config, data_root, out, cache_dir, log)
    sums, merged_sets = plan_subsets(config.domains, config.max_sum_size, config.merged_subsets)
    trained = train_stage(ctx, merged_sets)
    if any(m.name == "regmean" for m in config.methods):
        statistics_stage(ctx, trained)
    exposed = expose_adapters(ctx, trained)
    log(f"trained adapters: {out / 'adapters'} ({len(exposed)} folders)")
    t0 = time.perf_counter()
    jobs, fits = plan_jobs(ctx, trained, sums, merged_sets)
    records = evaluation_stage(ctx, jobs, trained)
    probes = probe_stage(ctx, trained)
    evaluation_s = time.perf_counter() - t0
    log("analysing (bootstrap intervals, fits, predictors)")
    result = analyse(config, records, trained, probes, fits, sums, merged_sets)
    result.versions = versions()
    result.timings.update(training_s=trained.seconds, evaluation_s=evaluation_s,
                          total_s=time.perf_counter() - t_start)
    return result


def _domain_path(spec: str, data_root: str | os.PathLike | None) -> str:
    if data_root is not None and not os.path.isabs(spec) and (Path(data_root) / spec).exists():
        return str(Path(data_root) / spec)
    return spec
