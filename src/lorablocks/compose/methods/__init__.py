"""Composition methods: one file per method, found automatically.

A method turns the weighted blocks of one module, ``[(w_i, dW_i), ...]`` (scales folded into the factors),
into that module's combined factored delta. It never sees files or models: :func:`lorablocks.compose.compose`
streams modules through it one at a time. To add a method, add a file here that defines ``METHOD``; no
caller changes.

Each method declares its parameters as a pydantic model (unknown parameters are refused), so a recipe's
``params`` are validated before any work.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from lorablocks.core import algebra
from lorablocks.core.algebra import CompressionReport, LowRank
from lorablocks.errors import CompositionError

__all__ = ["MethodParams", "ModuleContext", "ModuleResult", "Method", "get_method", "method_names", "validate_params"]


class MethodParams(BaseModel):
    """Base of every method's parameters: frozen, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class ModuleContext:
    """What a method may know about the module it combines, besides the blocks."""

    #: full module name (e.g. ``model.layers.0.self_attn.q_proj``)
    name: str
    #: rank mode of the result: ``concat``, ``minimal`` or a cap ``N``
    rank: str | int = "minimal"
    #: ``minimal``: singular values below ``rtol * s_max`` are dropped
    rtol: float = 1e-6
    #: for each part handed to ``combine``: the index of its block in the recipe
    blocks: tuple[int, ...] = ()
    #: for each part: the Gram of the module's inputs on its block's data (a
    #: :class:`~lorablocks.core.regmean.InputGram`), filled only for a method that ``needs_statistics``
    grams: tuple[Any, ...] = ()

    def compress(self, x: LowRank | None) -> ModuleResult:
        """Re-factor ``x`` at the recipe's rank mode, with the truncation report."""
        if x is None or x.rank == 0:
            report = CompressionReport(mode=str(self.rank))
            report.rank_in[self.name], report.rank_out[self.name] = 0, 0
            report.rel_error[self.name], report.norm_sq[self.name], report.dropped_sq[self.name] = 0.0, 0.0, 0.0
            return ModuleResult(None, report)
        out, report = algebra.compress({self.name: x}, rank=self.rank, rtol=self.rtol)
        return ModuleResult(out.get(self.name), report)

    def generator(self, seed: int) -> torch.Generator:
        """A generator seeded by ``seed`` and this module's name: the same seed gives the same bytes,
        whatever order modules are visited in."""
        import hashlib

        digest = hashlib.sha256(f"{seed}:{self.name}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@dataclass
class ModuleResult:
    """One module's combined delta (``None``: exactly zero) and what re-factoring it cost."""

    x: LowRank | None
    report: CompressionReport


#: ``combine(parts, params, ctx)``: ``parts`` are the ``(weight, delta)`` of the blocks that touch the module
Combine = Callable[[Sequence[tuple[float, LowRank]], Any, ModuleContext], ModuleResult]


@dataclass(frozen=True)
class Method:
    """A composition method: its name, one-line summary, parameter model and per-module rule."""

    name: str
    summary: str
    params: type[MethodParams]
    combine: Combine
    #: whether the result is exactly ``sum_i w_i dW_i`` (up to the rank mode)
    linear: bool = False
    #: whether blocks of weight 0 still reach ``combine`` (a method whose own parameters set the weights)
    uses_zero_weights: bool = False
    #: whether ``combine`` needs each block's input statistics (``ModuleContext.grams``)
    needs_statistics: bool = False


_REGISTRY: dict[str, Method] = {}


def _discover() -> dict[str, Method]:
    if not _REGISTRY:
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
            module = importlib.import_module(f"{__name__}.{info.name}")
            method = getattr(module, "METHOD", None)
            if isinstance(method, Method):
                _REGISTRY[method.name] = method
    return _REGISTRY


def method_names() -> list[str]:
    """The names of every available method, ``sum`` first."""
    names = sorted(_discover())
    return ["sum"] + [n for n in names if n != "sum"] if "sum" in names else names


def get_method(name: str) -> Method:
    """The method called ``name``; :class:`CompositionError` naming the choices otherwise."""
    methods = _discover()
    if name not in methods:
        raise CompositionError(f"unknown method {name!r}; choose one of {', '.join(method_names())}", setting="method")
    return methods[name]


def validate_params(method: Method, params: dict[str, Any]) -> MethodParams:
    """``params`` checked against the method's parameter model; every problem in one error."""
    bad = [k for k, v in params.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:  # the bounds checks would blame the bound ("less than or equal to 1") for a NaN
        raise CompositionError("; ".join(f"{k}: must be a finite number, got {params[k]}" for k in bad), setting=bad[0])
    try:
        return method.params.model_validate(params)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            key = ".".join(map(str, e["loc"])) or "params"
            text = str(e["msg"]).removeprefix("Value error, ")
            msg = f"method {method.name} takes no parameter {key}" if e["type"] == "extra_forbidden" else f"{key}: {text}"
            problems.append(msg)
        raise CompositionError("; ".join(problems), setting=str(exc.errors()[0]["loc"][0]) if exc.errors()[0]["loc"] else None) from None
