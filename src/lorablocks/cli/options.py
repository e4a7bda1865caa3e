"""Parsing shared by the verbs: text from the command line into the library's typed values.

Errors name the flag (the library speaks of settings, the command line of flags).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Optional

import typer

from lorablocks.errors import LoraBlocksError

__all__ = ["parse_weights", "parse_rank", "method_params", "ForceOpt", "RankOpt", "RtolOpt", "WeightsOpt",
           "MethodOpt", "AllowBaseOpt", "DensityOpt", "SpaceOpt", "SeedOpt", "MajorityOpt", "FractionOpt", "MergeOpt", "AlphaOpt"]


def parse_weights(text: str | None, n: int) -> list[float] | None:
    """``--weights 1,1,-1``: one finite number per adapter (``None`` when not given: all 1)."""
    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise LoraBlocksError(f"--weights must be comma-separated numbers, got {text!r}") from None
    if len(weights) != n:
        raise LoraBlocksError(f"--weights has {len(weights)} values for {n} adapters")
    if not all(math.isfinite(w) for w in weights):
        raise LoraBlocksError(f"--weights must be finite numbers, got {text!r}")
    return weights


def parse_rank(value: str) -> str | int:
    """``--rank concat|minimal|N``."""
    if value.isdigit() and int(value) >= 1:
        return int(value)
    if value in ("concat", "minimal"):
        return value
    raise LoraBlocksError(f"--rank must be concat, minimal or a positive integer, got {value!r}")


def method_params(**given: Any) -> dict[str, Any]:
    """The method parameters that were given on the command line (the method refuses ones it does not take)."""
    return {k: v for k, v in given.items() if v is not None}


ForceOpt = Annotated[bool, typer.Option("--force", help="Replace a previous lorablocks output of the same kind at this path.")]
RankOpt = Annotated[str, typer.Option("--rank", help="concat (exact, rank sum r), minimal (exact, smallest rank) or N (truncate; error reported).")]
RtolOpt = Annotated[float, typer.Option("--rtol", help="minimal rank: drop singular values below rtol * largest.")]
WeightsOpt = Annotated[Optional[str], typer.Option("--weights", help="Comma-separated weights, e.g. 1,1,-1 (default all 1).")]
MethodOpt = Annotated[str, typer.Option("--method", help="Composition method (sum is the paper's exact sum).")]
AllowBaseOpt = Annotated[bool, typer.Option("--allow-base-mismatch", help="Combine adapters whose configs record different base models (shapes are still checked).")]
DensityOpt = Annotated[Optional[float], typer.Option("--density", help="ties/dare/magnitude_prune: fraction of entries kept, in (0, 1].")]
SpaceOpt = Annotated[Optional[str], typer.Option("--space", help="ties/dare/magnitude_prune: core (factored, default) or full (dense per module, then re-factored).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="dare: seed of the random drop (the same seed gives the same bytes).")]
FractionOpt = Annotated[Optional[float], typer.Option("--fraction", help="tsv: fraction of min(out, in) singular triplets kept per block (default 1/n).")]
MergeOpt = Annotated[Optional[str], typer.Option("--merge", help="knots: how the aligned parts are merged, linear or ties.")]
AlphaOpt = Annotated[Optional[float], typer.Option("--alpha", help="regmean: share of each Gram's off-diagonal kept, in [0, 1] [0.9].")]
MajorityOpt = Annotated[Optional[str], typer.Option("--majority-sign", help="ties/dare_ties: sign election by total or frequency.")]
