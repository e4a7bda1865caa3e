"""File-level operations behind ``combine``, ``subtract``, ``similarity`` and ``inspect``.

Each opens and validates every input before it writes anything, builds a :class:`~lorablocks.compose.recipe.Recipe`
and goes through :func:`~lorablocks.compose.recipe.compose` (the one seam), and writes its output
atomically with the recipe as its record (plus inputs, versions and the truncation report).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lorablocks.compose.recipe import Block, Composition, Recipe, compose, make_recipe
from lorablocks.core import algebra
from lorablocks.core.overlap import adapter_stats, overlap_matrices
from lorablocks.errors import BaseModelMismatchError, CompositionError, LoraBlocksError, ShapeMismatchError
from lorablocks.files.adapters import AdapterFile, load_adapter, open_adapter
from lorablocks.files.writer import AdapterWriter
from lorablocks.files.outputs import check_output_free, versions

__all__ = [
    "open_blocks",
    "blocks_of",
    "CombineRequest",
    "combine_files",
    "write_composition",
    "similarity_report",
    "inspect_report",
    "natural_key",
]


def natural_key(name: str) -> list[Any]:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def check_same_base_model(files: Sequence[AdapterFile]) -> None:
    """Refuse adapters whose configs record different base models (unknown ones match anything)."""
    from lorablocks.model.models import same_base_model

    known = [f for f in files if f.base_model]
    for f in known[1:]:
        if not same_base_model(f.base_model, known[0].base_model):
            raise BaseModelMismatchError(
                f"{known[0].path} was trained on {known[0].base_model} but {f.path} on {f.base_model}",
                setting="allow_base_mismatch",
            )


def open_blocks(paths: Sequence[str | os.PathLike], *, allow_base_mismatch: bool = False) -> list[AdapterFile]:
    """Open every adapter (headers only) and check that they fit together, before any work."""
    if not paths:
        raise LoraBlocksError("no adapters given", setting="adapters")
    files = [open_adapter(p) for p in paths]
    if not allow_base_mismatch:
        check_same_base_model(files)
    algebra.check_compatible([f.shapes for f in files], [str(f.path) for f in files])
    if len({f.fan_in_fan_out for f in files}) > 1:
        raise ShapeMismatchError("the adapters disagree on fan_in_fan_out: they were made for different model types")
    return files


def blocks_of(files: Sequence[AdapterFile], weights: Sequence[float] | None = None) -> list[Block]:
    """One :class:`Block` per adapter file, with its weight (default 1)."""
    weights = [1.0] * len(files) if weights is None else list(weights)
    if len(weights) != len(files):
        raise CompositionError(f"{len(weights)} weights for {len(files)} adapters", setting="weights")
    return [Block(name=f.name, weight=float(w), path=str(f.path), sha256=f.sha256, scales=f.scales_sha256,
                  base_model=f.base_model) for f, w in zip(files, weights)]


@dataclass(frozen=True)
class CombineRequest:
    """What ``combine`` was asked for (every field has the library's default)."""

    weights: Sequence[float] | None = None
    method: str = "sum"
    params: Mapping[str, Any] | None = None
    rank: str | int = "minimal"
    rtol: float = 1e-6
    allow_base_mismatch: bool = False
    #: regmean: one domain per block, for blocks without stored statistics (collected now with ``model``)
    data: Sequence[str] = ()
    model: str | None = None


def combine_files(paths: Sequence[str | os.PathLike], out: str | os.PathLike, request: CombineRequest | None = None,
                  *, merge_into: str | os.PathLike | None = None, force: bool = False) -> Composition:
    """Combine adapter folders as ``request`` says and write one adapter (or, with ``merge_into``, a
    merged model folder). Everything is validated before anything is written."""
    request = request or CombineRequest()
    inputs = [*paths, *([merge_into] if merge_into is not None else [])]
    check_output_free(out, force, kind="merged-model" if merge_into is not None else "adapter", inputs=inputs)
    files = open_blocks(paths, allow_base_mismatch=request.allow_base_mismatch)
    recipe = make_recipe(blocks_of(files, request.weights), method=request.method, params=request.params,
                         rank=request.rank, rtol=request.rtol)
    statistics = None
    if request.data or request.model:
        from lorablocks.compose.methods import get_method
        from lorablocks.compose.statistics import statistics_now
        from lorablocks.model.models import DEFAULT_MODEL

        if not get_method(recipe.method).needs_statistics:
            raise CompositionError(f"--data/--model are not used by method {recipe.method}", setting="data")
        if not request.data and any(f.statistics is None for f in files):
            raise CompositionError("--model without --data: give one domain per adapter to collect the missing "
                                   "statistics on", setting="data")
        statistics = statistics_now(files, list(request.data) or [""] * len(files), request.model or DEFAULT_MODEL)
    return write_composition(recipe, files, out, merge_into=merge_into, force=force, statistics=statistics)


def write_composition(recipe: Recipe, files: Sequence[AdapterFile], out: str | os.PathLike, *,
                      extra_record: Mapping[str, Any] | None = None, merge_into: str | os.PathLike | None = None,
                      force: bool = False, statistics: Sequence[Any] | None = None) -> Composition:
    """Compose ``recipe`` from opened ``files`` and write it as an adapter (streamed, one module at a time)
    or merged into a model folder; the record is the recipe, the truncation report and ``extra_record``."""
    if merge_into is not None:
        from lorablocks.model.merge import write_merged_model

        result = compose(recipe, files, statistics=statistics)
        write_merged_model(merge_into, result.delta, out,
                           {"kind": "merged-model", **result.record(), **(extra_record or {})}, force=force,
                           inputs=[f.path for f in files])
        return result
    with AdapterWriter(out, base_model=files[0].base_model, fan_in_fan_out=files[0].fan_in_fan_out,
                       task_type=files[0].config.get("task_type", "CAUSAL_LM"), force=force,
                       inputs=[f.path for f in files]) as writer:
        result = compose(recipe, files, sink=writer.add, statistics=statistics)
        writer.record = {"kind": "adapter", **result.record(), **(extra_record or {})}
    return result


def _clean(v: float) -> float | None:
    return None if math.isnan(v) else v


def similarity_report(paths: Sequence[str | os.PathLike], *, allow_base_mismatch: bool = False) -> dict[str, Any]:
    """The overlap of N adapters: N x N RMS and mean cosine, and per-module cosines per pair."""
    if len(paths) < 2:
        raise LoraBlocksError("similarity needs at least two adapters", setting="adapters")
    adapters = [f.load() for f in open_blocks(paths, allow_base_mismatch=allow_base_mismatch)]
    rms, mean, pairs = overlap_matrices([a.delta for a in adapters])
    return {
        "adapters": [str(a.path) for a in adapters],
        "sha256": [a.sha256 for a in adapters],
        "rms_cosine": [[_clean(v) for v in row] for row in rms],
        "mean_cosine": [[_clean(v) for v in row] for row in mean],
        "set": {"rms_cosine": _clean(pairs.rms_cosine), "mean_cosine": _clean(pairs.mean_cosine)},
        "pairs": [
            {"a": str(adapters[i].path), "b": str(adapters[j].path), "rms_cosine": _clean(p.rms_cosine),
             "mean_cosine": _clean(p.mean_cosine), "modules": {m: _clean(c) for m, c in p.cosines.items()}}
            for (i, j), p in pairs.pairs.items()
        ],
        "versions": versions(),
    }


def inspect_report(path: str | os.PathLike) -> dict[str, Any]:
    """One adapter: its config essentials and per-module rank, scale, norm and effective rank (modules in
    natural order: layer 2 before layer 10)."""
    a = load_adapter(path)
    stats = adapter_stats(a.delta)
    modules = sorted(a.delta, key=natural_key)
    return {
        "path": str(a.path), "sha256": a.sha256, "base_model": a.base_model,
        "r": a.config.get("r"), "lora_alpha": a.config.get("lora_alpha"),
        "use_rslora": bool(a.config.get("use_rslora", False)), "fan_in_fan_out": a.fan_in_fan_out,
        "n_modules": len(a.delta), "total_norm": stats.total_norm,
        "modules": {
            m: {"shape": list(a.delta[m].shape), "rank": stats.ranks[m], "alpha": a.module_scales[m][1],
                "scale": a.module_scales[m][2], "norm": stats.norms[m], "effective_rank": stats.effective_ranks[m]}
            for m in modules
        },
    }
