"""The composition seam: a typed :class:`Recipe` and the one function, :func:`compose`, that turns it into a
factored delta.

A recipe names its blocks (with their sha256 fingerprints and weights), the method and its parameters, and
the rank mode of the result. Every caller (``combine``, ``subtract``, evaluation, the study, the server)
builds a recipe and calls :func:`compose`; the ``lorablocks.json`` record beside an output *is* the recipe
plus versions and the truncation report. Methods plug in as files of :mod:`lorablocks.compose.methods`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lorablocks.compose.methods import ModuleContext, get_method, validate_params
from lorablocks.core import algebra
from lorablocks.core.algebra import CompressionReport, Delta, LowRank
from lorablocks.errors import CompositionError

__all__ = ["Block", "Recipe", "DeltaSource", "MemorySource", "Composition", "compose", "make_recipe",
           "scaled_overflows"]


class Block(BaseModel):
    """One block of a composition: which adapter (name, path, content fingerprint) and its weight."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Display name (the adapter folder's name).")
    weight: float = Field(1.0, description="Its weight w_i; negative subtracts (unlearning).")
    path: str | None = Field(None, description="Where it was read from.")
    sha256: str | None = Field(None, description="sha256 of its weights file: what the recipe really depends on.")
    scales: str | None = Field(None, description="sha256 of its config's effective per-module scales (lora_alpha, "
                                                 "rank_pattern, rsLoRA), which the weights file alone does not fix.")
    base_model: str | None = Field(None, description="Base model its adapter config records.")
    statistics_sha256: str | None = Field(None, description="sha256 of the input statistics a method like regmean "
                                                            "uses for it (checked against the source's).")


class Recipe(BaseModel):
    """Blocks with weights, a method with its parameters, and the rank mode of the result."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    blocks: tuple[Block, ...] = Field(description="The blocks, in order.")
    method: str = Field("sum", description="Composition method (see lorablocks.compose.methods).")
    params: dict[str, Any] = Field(default_factory=dict, description="The method's parameters.")
    rank: str | int = Field("minimal", description="concat (exact, rank sum r), minimal (exact, smallest) or N (cap).")
    rtol: float = Field(1e-6, description="minimal: singular values below rtol * largest are dropped.")

    @field_validator("rank")
    @classmethod
    def _rank(cls, v: str | int) -> str | int:
        if isinstance(v, str) and v.isdigit():
            v = int(v)
        if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
            return v
        if v in ("concat", "minimal"):
            return v
        raise ValueError(f"rank must be concat, minimal or a positive integer, got {v!r}")

    @field_validator("rtol")
    @classmethod
    def _rtol(cls, v: float) -> float:
        if not (math.isfinite(v) and 0.0 <= v < 1.0):
            raise ValueError(f"rtol must be a number in [0, 1), got {v}")
        return v

    @property
    def weights(self) -> list[float]:
        return [b.weight for b in self.blocks]

    def fingerprint(self, base: str | None = None) -> str:
        """sha256 of what determines the result: block contents (weights file, effective scales) and weights,
        method, params, rank mode; with ``base``, the identity of the model it is merged into.

        Names and paths do not count: the same adapters under other names give the same fingerprint.
        """
        key: dict[str, Any] = {
            "blocks": [[b.sha256 or b.name, b.weight] + ([b.statistics_sha256] if b.statistics_sha256 else [])
                       + ([{"scales": b.scales}] if b.scales else []) for b in self.blocks],
            "method": self.method, "params": self.resolved_params(), "rank": self.rank, "rtol": self.rtol}
        if base is not None:
            key["base"] = base
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def resolved_params(self) -> dict[str, Any]:
        """Every parameter of the method, the defaults of those not given included."""
        return validate_params(get_method(self.method), self.params).model_dump(mode="json")

    def record(self) -> dict[str, Any]:
        """The recipe as written into ``lorablocks.json`` (``params`` as given, so that it reads back through
        :func:`make_recipe`; ``resolved_params`` with every default), and its fingerprint."""
        return {**self.model_dump(mode="json"), "resolved_params": self.resolved_params(),
                "fingerprint": self.fingerprint()}


def make_recipe(blocks: Sequence[Block], *, method: str = "sum", params: Mapping[str, Any] | None = None,
                rank: str | int = "minimal", rtol: float = 1e-6) -> Recipe:
    """A validated recipe; every problem (weights, rank, method, parameters) as one :class:`CompositionError`."""
    if not blocks:
        raise CompositionError("a composition needs at least one block", setting="adapters")
    bad = [b.weight for b in blocks if not math.isfinite(b.weight)]
    if bad:
        raise CompositionError(f"weights must be finite numbers, got {bad[0]}", setting="weights")
    try:
        recipe = Recipe(blocks=tuple(blocks), method=method, params=dict(params or {}), rank=rank, rtol=rtol)
    except ValidationError as exc:
        e = exc.errors()[0]
        setting = next((str(p) for p in e["loc"] if isinstance(p, str) and p != "blocks"), None)
        setting = "weights" if "blocks" in e["loc"] else setting
        raise CompositionError(str(e["msg"]).removeprefix("Value error, "), setting=setting) from None
    method_obj = get_method(recipe.method)
    validate_params(method_obj, recipe.params)
    return recipe


class DeltaSource(Protocol):
    """Anything that yields a block's modules one at a time (an opened adapter file, a delta in memory)."""

    @property
    def modules(self) -> list[str]: ...

    def factors(self, module: str) -> LowRank: ...


@dataclass
class MemorySource:
    """A delta already in memory, as a :class:`DeltaSource`."""

    delta: Mapping[str, LowRank]

    @property
    def modules(self) -> list[str]:
        return list(self.delta)

    def factors(self, module: str) -> LowRank:
        return self.delta[module]

    #: the block's input statistics (a :class:`~lorablocks.files.statistics.BlockStatistics`), if any
    statistics: Any = None


@dataclass
class Composition:
    """What :func:`compose` made: the delta (empty when streamed to a sink), its report and its recipe."""

    recipe: Recipe
    report: CompressionReport
    delta: Delta = field(default_factory=dict)
    #: the input statistics used, per block (a method that ``needs_statistics`` only)
    statistics: list[dict[str, Any]] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """The provenance record: the recipe, its fingerprint, the truncation report (and the statistics used)."""
        out = {"recipe": self.recipe.record(), "truncation": self.report.to_dict()}
        return {**out, "statistics": self.statistics} if self.statistics else out


def _as_source(x: DeltaSource | Mapping[str, LowRank]) -> DeltaSource:
    return MemorySource(x) if isinstance(x, Mapping) else x


def compose(recipe: Recipe, sources: Sequence[DeltaSource | Mapping[str, LowRank]],
            sink: Callable[[str, LowRank], None] | None = None, statistics: Sequence[Any] | None = None) -> Composition:
    """The factored delta of ``recipe``, one module at a time (``sources[i]`` holds block ``i``).

    A method that ``needs_statistics`` gets each block's Grams from ``statistics[i]`` or else from the
    source's ``statistics`` attribute (an adapter file's stored statistics); they are checked against the
    blocks (base model, modules, widths) before any work. Shapes are checked before any factor is read. Each module's blocks are read (from disk for a file
    source), combined by the recipe's method, re-factored at its rank mode and handed to ``sink`` (then
    dropped: memory holds one module at a time) or kept in ``Composition.delta``. The composition's recipe
    is ``recipe`` with the statistics' fingerprints filled in (:func:`with_statistics`): use it, not ``recipe``.
    """
    if len(sources) != len(recipe.blocks):
        raise CompositionError(f"{len(recipe.blocks)} blocks in the recipe but {len(sources)} sources given",
                               setting="weights")
    srcs = [_as_source(s) for s in sources]
    method = get_method(recipe.method)
    params = validate_params(method, recipe.params)
    held = [set(s.modules) for s in srcs]  # once: a file source builds its module list on every call
    names = list(dict.fromkeys(n for s in srcs for n in s.modules))
    result = Composition(recipe=recipe, report=CompressionReport(mode=str(recipe.rank)))
    stats = _statistics(recipe, srcs, statistics) if method.needs_statistics else None
    for name in names:
        index = [i for i, h in enumerate(held) if name in h]
        parts = [(recipe.blocks[i].weight, srcs[i].factors(name)) for i in index]
        algebra.check_compatible([{name: x} for _, x in parts], [recipe.blocks[i].name for i in index])
        if not method.uses_zero_weights:
            index, parts = [i for i, p in zip(index, parts) if p[0] != 0.0], [p for p in parts if p[0] != 0.0]
        _check_scaled_finite(name, parts, [recipe.blocks[i].name for i in index])
        if not parts:
            continue
        grams = tuple(stats[i].gram(name) for i in index) if stats is not None else ()
        ctx = ModuleContext(name=name, rank=recipe.rank, rtol=recipe.rtol, blocks=tuple(index), grams=grams)
        try:
            out = method.combine(parts, params, ctx)
        except (RuntimeError, ArithmeticError) as exc:  # torch.linalg.LinAlgError is a RuntimeError
            raise CompositionError(
                f"module {name}: the {method.name} composition failed numerically ({type(exc).__name__}); "
                "the weighted factors are too large or degenerate", setting="weights") from None
        result.report.update(out.report)
        if out.x is not None and out.x.rank > 0:
            algebra.check_finite({name: out.x}, label="the composition")
            if sink is None:
                result.delta[name] = out.x
            else:
                sink(name, out.x)
        del parts, out
        if sink is not None:  # streaming: hand each module's memory back before the next
            _release_freed_memory()
    if stats is not None:  # after the work: a statistics file's digest is computed in the background meanwhile
        result.statistics = [s.record() for s in stats]
        result.recipe = with_statistics(recipe, stats)
    return result


def with_statistics(recipe: Recipe, stats: Sequence[Any]) -> Recipe:
    """``recipe`` with each block's ``statistics_sha256`` set from the statistics used (those of a file; in
    memory statistics have none), so that its fingerprint changes when the statistics do."""
    blocks = tuple(b if st.sha256 is None else b.model_copy(update={"statistics_sha256": st.sha256})
                   for b, st in zip(recipe.blocks, stats))
    return recipe.model_copy(update={"blocks": blocks})


def _statistics(recipe: Recipe, srcs: Sequence[DeltaSource], given: Sequence[Any] | None) -> list[Any]:
    """Each block's input statistics, checked to fit it; one line naming the first block without them."""
    from lorablocks.compose.statistics import shapes_of

    stats = list(given) if given is not None else [getattr(s, "statistics", None) for s in srcs]
    if len(stats) != len(srcs):
        raise CompositionError(f"{len(stats)} statistics for {len(srcs)} blocks", setting="statistics")
    for block, src, st in zip(recipe.blocks, srcs, stats):
        if st is None:
            raise CompositionError(
                f"{block.path or block.name} has no input statistics, which {recipe.method} needs: collect them "
                "with `lorablocks stats BLOCK --data DOMAIN`, or give --data (one domain per block) to compute "
                "them now", setting="statistics")
        if block.statistics_sha256 and st.sha256 and block.statistics_sha256 != st.sha256:
            raise CompositionError(f"the statistics of {block.path or block.name} changed since the recipe was made "
                                   f"({st.sha256[:12]}, recipe {block.statistics_sha256[:12]})", setting="statistics")
        made_for = (st.data or {}).get("adapter_sha256")
        if made_for and block.sha256 and made_for != block.sha256:
            raise CompositionError(f"the statistics of {block.path or block.name} were collected for other weights "
                                   "(they are of the block's own model): collect them again with `lorablocks stats "
                                   "--force`", setting="statistics")
        st.check_fits(shapes_of(src), block.base_model, str(block.path or block.name))
    return stats


def scaled_overflows(weight: float, x: LowRank) -> bool:
    """Would ``weight * A`` overflow the factors' float type (products of factors must stay finite too)?"""
    limit = float(torch.finfo(x.A.dtype).max) ** 0.5
    return bool(x.A.numel()) and float(x.A.abs().max()) * abs(weight) >= limit


def _check_scaled_finite(name: str, parts: Sequence[tuple[float, LowRank]], blocks: Sequence[str]) -> None:
    """Refuse weights so large that ``w * A`` overflows the factors' float type."""
    for (w, x), block in zip(parts, blocks):
        if scaled_overflows(w, x):
            raise CompositionError(f"block {block}: weight {w:g} times its factors overflows "
                                   f"{str(x.A.dtype).removeprefix('torch.')} (module {name})", setting="weights")


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, inflating peak RSS module by module)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to do
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None
