"""The ``eval`` job: per-domain and joint perplexity of a base model with a composition merged in.

:func:`run_evaluation` takes an :class:`EvalRequest` (what the user asked for, in the library's terms),
validates everything it can before loading the model (data files, adapters, the recipe), applies the
composition to a :class:`~lorablocks.model.session.ComposedModel` and scores the held-out split.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorablocks.compose.operations import blocks_of, open_blocks
from lorablocks.compose.recipe import Recipe, make_recipe
from lorablocks.errors import ConfigError
from lorablocks.files.adapters import CONFIG_NAME
from lorablocks.files.outputs import versions
from lorablocks.model.models import DEFAULT_MODEL
from lorablocks.passes.evaluate import (DEFAULT_EVAL_BATCH_TOKENS, DEFAULT_EVAL_MAX_LENGTH, EvalResult,
                                         evaluate_perplexity, prepare_eval_set)

__all__ = ["EvalRequest", "EvalReport", "split_adapters_and_domains", "run_evaluation"]


@dataclass(frozen=True)
class EvalRequest:
    """An evaluation: the base model, the composition (adapters, weights, method) and the data."""

    domains: Sequence[str]
    model: str = DEFAULT_MODEL
    adapters: Sequence[str | os.PathLike] = ()
    weights: Sequence[float] | None = None
    method: str = "sum"
    params: Mapping[str, Any] = field(default_factory=dict)
    split: str = "test"
    limit: int | None = None
    max_length: int = DEFAULT_EVAL_MAX_LENGTH
    batch_tokens: int = DEFAULT_EVAL_BATCH_TOKENS
    allow_base_mismatch: bool = False
    cache_dir: str | os.PathLike | None = None
    #: the model body's precision (auto: bf16 where native); the head and the NLL stay fp32
    precision: str = "auto"

    def problems(self) -> list[tuple[str, str]]:
        """Every invalid setting as ``(setting, message)`` (empty when the request is valid)."""
        out = []
        if self.limit is not None and self.limit < 1:
            out.append(("limit", f"limit must be a positive integer, got {self.limit}"))
        if self.split not in ("train", "validation", "test"):
            out.append(("split", f"split must be train, validation or test, got {self.split!r}"))
        if self.precision not in ("auto", "fp32", "bf16"):
            out.append(("precision", f"precision must be auto, fp32 or bf16, got {self.precision!r}"))
        if self.max_length < 16:
            out.append(("max_length", f"max_length must be >= 16, got {self.max_length}"))
        if self.weights is not None and not self.adapters:
            out.append(("weights", "weights given without adapters"))
        return out


@dataclass
class EvalReport:
    """The scores and the record written beside them (model, recipe, data fingerprints, versions)."""

    result: EvalResult
    recipe: Recipe | None
    record: dict[str, Any]


def split_adapters_and_domains(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """Sort loose arguments: a folder holding an adapter config is an adapter, anything else a domain."""
    adapters = [x for x in items if (Path(x) / CONFIG_NAME).is_file()]
    return adapters, [x for x in items if x not in adapters]


def run_evaluation(request: EvalRequest) -> EvalReport:
    """Validate, load, apply the composition, score every domain; the exact base weights come back after."""
    from lorablocks.model.session import ComposedModel
    from lorablocks.training.data import resolve_domains

    problems = request.problems()
    if problems:
        raise ConfigError("invalid evaluation: " + "; ".join(m for _, m in problems), setting=problems[0][0])
    domains = resolve_domains(request.domains)
    files = open_blocks(request.adapters, allow_base_mismatch=request.allow_base_mismatch) if request.adapters else []
    recipe = make_recipe(blocks_of(files, request.weights), method=request.method, params=request.params,
                         rank="concat") if files else None
    session = ComposedModel.load(request.model, cache_dir=request.cache_dir)
    if not request.allow_base_mismatch:
        session.check_base_model([(str(f.path), f.base_model) for f in files])
    eval_set = prepare_eval_set(session.tokenizer, domains, split=request.split, limit=request.limit,
                                max_length=request.max_length, batch_tokens=request.batch_tokens)
    if recipe is not None:
        session.apply_recipe(recipe, files)  # checks every module's shape before touching a weight
    try:
        result = evaluate_perplexity(session.model, eval_set, precision=request.precision)
    finally:
        session.clear()
    record = {
        "tool": "lorablocks", "kind": "eval", "model": session.model_id,
        "recipe": recipe.record() if recipe else None, "split": request.split, "limit": request.limit,
        "max_length": request.max_length, "precision": result.precision,
        "data": {d.name: {"source": d.source, "sha256": eval_set.fingerprints.get(d.name)} for d in domains},
        **result.to_dict(), "versions": versions(),
    }
    return EvalReport(result=result, recipe=recipe, record=record)
