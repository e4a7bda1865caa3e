"""The study's results: what the analysis (:mod:`lorablocks.study.analysis`) hands the report."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lorablocks.study.inference import FitStats
from lorablocks.study.resample import Interval

__all__ = ["SubsetResult", "GapClosed", "MethodResult", "FinePoint", "DegradationPoint", "MethodSummary", "UnlearnResult",
           "PairResult", "StudyResult", "Inputs", "Records"]

Records = Mapping[tuple[str, "int | None"], dict]


@dataclass
class SubsetResult:
    """A sum of blocks: its overlap predictors, perplexities, and changes vs merged-data and single blocks."""

    domains: tuple[str, ...]
    predictors: dict[str, float]
    ppl_sum: dict[str, float]
    ppl_merged: dict[str, float] | None
    vs_merged: dict[str, Interval] | None
    vs_single: dict[str, Interval]
    seed_sd_vs_merged: float | None
    paper_change_pct: float | None

    @property
    def size(self) -> int:
        return len(self.domains)


@dataclass
class GapClosed:
    """How much of the naive sum's gap to merged-data (joint perplexity) a method closes, and how much the single
    blocks on their own domains close: the ceiling of any composition that makes each block act as itself on its
    own domain's inputs (RegMean's aim); ``None`` where the sum is not worse than merged-data. The ``ppl_*`` are
    seed means; the shares are ratios of the joint changes vs the sum pooled over seeds (see ``analysis._gap``)."""

    ppl_sum: float
    ppl_merged: float
    ppl_method: float
    ppl_singles: float
    closed: float | None
    ceiling: float | None
    #: 95 % bootstrap interval of ``closed`` (the study's shared resamples: the method's and merged-data's changes
    #: vs the sum in the same draw); a bound is infinite where the gap itself vanishes in over 2.5 % of the draws
    interval: tuple[float, float] | None = None


@dataclass
class MethodResult:
    """A composition method on one subset: its changes vs the naive sum and vs merged-data training."""

    method: str
    domains: tuple[str, ...]
    vs_sum: dict[str, Interval]
    vs_merged: dict[str, Interval] | None
    fit: dict[str, Any] | None = None
    gap: GapClosed | None = None


@dataclass
class MethodSummary:
    """Per method (the naive sum included): vs merged-data on how many subsets (adjusted decisions)."""

    method: str
    subsets: int
    better: int
    no_different: int
    worse: int
    family: str


@dataclass
class FinePoint:
    """One domain in one sum: its change vs its single block (seeds pooled) and its predictors (seed mean)."""

    subset: tuple[str, ...]
    domain: str
    change: Interval
    predictors: dict[str, float]

    @property
    def blocks(self) -> int:
        return len(self.subset)


@dataclass
class DegradationPoint:
    """Own-domain change vs the single block, pooled over all ``method`` combinations of ``blocks`` blocks."""

    method: str
    blocks: int
    pooled: Interval
    mean: float
    worst: float
    n: int


@dataclass
class UnlearnResult:
    """Subtracting one block from the sum of all."""

    domain: str
    ppl: dict[str, float]
    vs_base: Interval
    vs_sum_all: Interval
    others_vs_sum_all: dict[str, Interval]
    delta_rel_diff: float
    #: methods that unlearn by recomposing without the block (``unlearn-<method>:<domain>``): vs the base model
    by_method: dict[str, Interval] = field(default_factory=dict)


@dataclass
class PairResult:
    """A pair of domains: its predictors and what their sum did to them."""

    a: str
    b: str
    near: bool
    predictors: dict[str, float]
    mean_change_vs_single: float


@dataclass
class StudyResult:
    """Everything the report needs (see :func:`lorablocks.study.report.write_report`)."""

    config: dict[str, Any]
    domains: list[str]
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    subsets: list[SubsetResult] = field(default_factory=list)
    methods: list[MethodResult] = field(default_factory=list)
    method_summary: list[MethodSummary] = field(default_factory=list)
    overlap: dict[str, Any] = field(default_factory=dict)
    fine: list[FinePoint] = field(default_factory=list)
    fits: list[FitStats] = field(default_factory=list)
    fit_points: dict[str, dict[str, Any]] = field(default_factory=dict)
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    degradation: list[DegradationPoint] = field(default_factory=list)
    unlearning: list[UnlearnResult] = field(default_factory=list)
    pairs: list[PairResult] = field(default_factory=list)
    inference: dict[str, Any] = field(default_factory=dict)
    training: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


@dataclass
class Inputs:
    """What the analysis reads: the evaluation records, the trained blocks' deltas (per ``(seed, subset)``)
    and training records, the probes per seed, the learned fits, the subsets summed and merged."""

    records: Records
    deltas: Mapping
    training: list[dict[str, Any]]
    probes: Mapping[int, dict]
    fits: Mapping
    sums: list[tuple[str, ...]]
    merged_sets: list[tuple[str, ...]]
