"""The study's numbers from its evaluations, each change with a 95 % paired-bootstrap interval.

Definitions (BRIEF, "Exact definitions"):

* perplexity ``exp(total NLL / counted tokens)``; the joint perplexity of a subset pools the same number
  of examples from each of its domains (the smallest domain's count, first examples in order);
* change ``100 * (PPL_new - PPL_ref) / PPL_ref``, per domain and joint, with the interval of
  :func:`lorablocks.study.stats.paired_change` (examples resampled per domain and seed, pairs together);
* weight overlap: RMS (and signed mean) cosine of the deltas over common modules; function overlap:
  ``I(j -> i)`` of :mod:`lorablocks.core.function_overlap` on the base model's inputs of domain ``i``.

Two fits of interference against overlap: the paper's (joint change of each sum vs its merged-data
adapter, one point per subset and seed) and a fine one (each domain's change in each sum vs its single
adapter, one point per sum, domain and seed), each against the weight cosine and the function overlap.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lorablocks.compose import Block, compose, make_recipe
from lorablocks.core import algebra
from lorablocks.core.overlap import overlap_matrices, pair_overlap
from lorablocks.study.config import StudyConfig
from lorablocks.study.stats import Interval, compare_predictors, fit_with_uncertainty, paired_change

__all__ = ["PAPER_CHANGES", "SubsetResult", "MethodResult", "FinePoint", "FitResult", "DegradationPoint",
           "UnlearnResult", "PairResult", "StudyResult", "analyse", "joint_perplexity"]

#: Figures reported by the paper (GPT-2 Small; change of the naive sum vs a merged-data LoRA, joint PPL).
PAPER_CHANGES = {("math", "medicine"): -9.10, ("finance", "math"): 4.54, ("finance", "medicine"): 27.56}

Records = Mapping[tuple[str, int | None], dict]


def joint_perplexity(per_example: Mapping[str, Sequence[Sequence[float]]], domains: Sequence[str]) -> float:
    """Token-weighted perplexity over ``domains`` with the same number of examples from each."""
    m = min(len(per_example[d]) for d in domains)
    rows = [r for d in domains for r in per_example[d][:m]]
    tokens = sum(int(r[1]) for r in rows)
    return math.exp(math.fsum(r[0] for r in rows) / tokens) if tokens else math.nan


@dataclass
class SubsetResult:
    """A sum of blocks: its overlap, perplexities, and changes vs merged-data training and vs single blocks."""

    domains: tuple[str, ...]
    rms_cosine: float
    mean_cosine: float
    function_overlap: float
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
class MethodResult:
    """A composition method on one subset: its changes vs the naive sum and vs merged-data training."""

    method: str
    domains: tuple[str, ...]
    vs_sum: dict[str, Interval]
    vs_merged: dict[str, Interval] | None
    fit: dict[str, Any] | None = None


@dataclass
class FinePoint:
    """One domain in one sum: its change vs its single block and the overlap predictors for it."""

    subset: tuple[str, ...]
    domain: str
    seed: int
    change: Interval
    weight_rms: float
    weight_mean: float
    function: float


@dataclass
class FitResult:
    """Change against one predictor: the points' coordinates and the fit with its uncertainty."""

    level: str
    predictor: str
    x: list[float]
    y: list[float]
    labels: list[str]
    stats: dict[str, Any]


@dataclass
class DegradationPoint:
    """Own-domain change vs the single block, pooled over all sums of ``blocks`` blocks."""

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


@dataclass
class PairResult:
    """A pair of domains: both overlaps and what their sum did to them (fine points of that pair's sum)."""

    a: str
    b: str
    near: bool
    rms_cosine: float
    mean_cosine: float
    function_overlap: float
    mean_change_vs_single: float


@dataclass
class StudyResult:
    """Everything the report needs (see :func:`lorablocks.study.report.write_report`)."""

    config: dict[str, Any]
    domains: list[str]
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    subsets: list[SubsetResult] = field(default_factory=list)
    methods: list[MethodResult] = field(default_factory=list)
    overlap: dict[str, Any] = field(default_factory=dict)
    fine: list[FinePoint] = field(default_factory=list)
    fits: list[FitResult] = field(default_factory=list)
    comparisons: dict[str, Interval] = field(default_factory=dict)
    degradation: list[DegradationPoint] = field(default_factory=list)
    unlearning: list[UnlearnResult] = field(default_factory=list)
    pairs: list[PairResult] = field(default_factory=list)
    training: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- helpers


class _Changes:
    """Paired-bootstrap changes between evaluations, pooling seeds, with the study's bootstrap settings."""

    def __init__(self, records: Records, seeds: Sequence[int], resamples: int, seed: int) -> None:
        self.records, self.seeds, self.resamples, self.seed = records, list(seeds), resamples, seed

    def rows(self, label: str, seed: int | None, domain: str, m: int | None = None) -> list:
        rows = self.records[(label, seed)]["per_example"][domain]
        return rows[:m] if m is not None else rows

    def change(self, new: str, ref: str, domains: Sequence[str], *, ref_seedless: bool = False,
               seeds: Sequence[int] | None = None) -> Interval:
        """``new`` vs ``ref`` over ``domains`` (several: the joint change, equal examples per domain)."""
        seeds = self.seeds if seeds is None else seeds
        m = min(len(self.rows(new, seeds[0], d)) for d in domains) if len(domains) > 1 else None
        a = [self.rows(new, s, d, m) for s in seeds for d in domains]
        b = [self.rows(ref, None if ref_seedless else s, d, m) for s in seeds for d in domains]
        return paired_change(a, b, self.resamples, self.seed)

    def pooled(self, pairs: Sequence[tuple[str, str, str, int]]) -> Interval:
        """One change pooled over ``(new label, ref label, domain, seed)`` groups."""
        a = [self.rows(n, s, d) for n, _, d, s in pairs]
        b = [self.rows(r, s, d) for _, r, d, s in pairs]
        return paired_change(a, b, self.resamples, self.seed)

    def ppl(self, label: str, domain: str) -> float:
        vals = [self.records[(label, s)]["domains"][domain]["perplexity"] for s in self.seeds if (label, s) in self.records]
        if not vals and (label, None) in self.records:
            vals = [self.records[(label, None)]["domains"][domain]["perplexity"]]
        return statistics.fmean(vals) if vals else math.nan

    def joint(self, label: str, domains: Sequence[str]) -> float:
        return statistics.fmean(joint_perplexity(self.records[(label, s)]["per_example"], domains) for s in self.seeds)


def _mean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(vals) if vals else math.nan


def _rms(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return math.sqrt(statistics.fmean(v * v for v in vals)) if vals else math.nan


def _overlap(config: StudyConfig, deltas: Mapping, probes: Mapping[int, dict]) -> dict[str, Any]:
    doms, seeds = list(config.domains), list(config.seeds)
    per = {s: overlap_matrices([deltas[(s, (d,))] for d in doms]) for s in seeds}
    n = len(doms)
    avg = lambda mats: [[_mean([m[i][j] for m in mats]) for j in range(n)] for i in range(n)]  # noqa: E731
    out = {"domains": doms, "rms_cosine": avg([per[s][0] for s in seeds]), "mean_cosine": avg([per[s][1] for s in seeds])}
    if probes:
        out["interference"] = avg([probes[s]["interference"] for s in seeds])
        out["functional_cosine"] = avg([probes[s]["cosine"] for s in seeds])
    return out


def _weight_cos(deltas: Mapping, seed: int, d: str, others: Sequence[str]) -> tuple[float, float]:
    """RMS and signed mean cosine between block ``d`` and the other blocks, over pairs and common modules."""
    cos = [c for e in others for c in pair_overlap(deltas[(seed, (d,))], deltas[(seed, (e,))]).cosines.values()]
    return _rms(cos), _mean(cos)


def _function(probes: Mapping[int, dict], doms: Sequence[str], seed: int, d: str, others: Sequence[str]) -> float:
    """``sum_{j in others} I(j -> d)``: how strongly the other blocks act on ``d``'s inputs (NaN: not probed)."""
    if seed not in probes:
        return math.nan
    i = doms.index(d)
    return sum(probes[seed]["interference"][doms.index(e)][i] for e in others)


# ------------------------------------------------------------------------------------------- analyses


def _subsets(ch: _Changes, cfg: StudyConfig, deltas, probes, sums, merged_sets) -> list[SubsetResult]:
    out = []
    doms = list(cfg.domains)
    for s in sums:
        lab = f"sum:{'+'.join(s)}"
        has = s in merged_sets
        wc = [_weight_cos(deltas, seed, d, [e for e in s if e != d]) for seed in cfg.seeds for d in s]
        fo = [_function(probes, doms, seed, d, [e for e in s if e != d]) / (len(s) - 1) for seed in cfg.seeds for d in s]
        vs_merged = None
        if has:
            mlab = f"merged:{'+'.join(s)}"
            vs_merged = {d: ch.change(lab, mlab, [d]) for d in s} | {"joint": ch.change(lab, mlab, s)}
            per_seed = [ch.change(lab, mlab, s, seeds=[k]).value for k in cfg.seeds]
        out.append(SubsetResult(
            domains=tuple(s), rms_cosine=_rms([w[0] for w in wc]), mean_cosine=_mean([w[1] for w in wc]),
            function_overlap=_mean(fo),
            ppl_sum={**{d: ch.ppl(lab, d) for d in s}, "joint": ch.joint(lab, s)},
            ppl_merged={**{d: ch.ppl(f"merged:{'+'.join(s)}", d) for d in s},
                        "joint": ch.joint(f"merged:{'+'.join(s)}", s)} if has else None,
            vs_merged=vs_merged, vs_single={d: ch.pooled([(lab, f"single:{d}", d, k) for k in cfg.seeds]) for d in s},
            seed_sd_vs_merged=statistics.stdev(per_seed) if has and len(per_seed) > 1 else None,
            paper_change_pct=PAPER_CHANGES.get(tuple(sorted(s)))))
    return out


def _fine(ch: _Changes, cfg: StudyConfig, deltas, probes, sums) -> list[FinePoint]:
    doms = list(cfg.domains)
    points = []
    for s in sums:
        for d in s:
            others = [e for e in s if e != d]
            for seed in cfg.seeds:
                wr, wm = _weight_cos(deltas, seed, d, others)
                points.append(FinePoint(tuple(s), d, seed, ch.pooled([(f"sum:{'+'.join(s)}", f"single:{d}", d, seed)]),
                                        wr, wm, _function(probes, doms, seed, d, others)))
    return points


def _fit(level: str, predictor: str, xs, ys, labels, cfg: StudyConfig) -> FitResult:
    keep = [i for i, x in enumerate(xs) if x is not None and not math.isnan(x)]
    x, y = [xs[i] for i in keep], [ys[i] for i in keep]
    stats = fit_with_uncertainty(x, y, cfg.analysis.bootstrap_resamples, cfg.analysis.bootstrap_seed).to_dict()
    return FitResult(level, predictor, x, y, [labels[i] for i in keep], stats)


def _fits(subsets: Sequence[SubsetResult], fine: Sequence[FinePoint], cfg: StudyConfig) -> tuple[list[FitResult], dict]:
    paper = [s for s in subsets if s.vs_merged is not None]
    py, pl = [s.vs_merged["joint"].value for s in paper], ["+".join(s.domains) for s in paper]
    fy, fl = [p.change.value for p in fine], [f"{'+'.join(p.subset)}:{p.domain}" for p in fine]
    fits = [_fit("paper", "rms_cosine", [s.rms_cosine for s in paper], py, pl, cfg),
            _fit("paper", "function_overlap", [s.function_overlap for s in paper], py, pl, cfg),
            _fit("fine", "rms_cosine", [p.weight_rms for p in fine], fy, fl, cfg),
            _fit("fine", "mean_cosine", [p.weight_mean for p in fine], fy, fl, cfg),
            _fit("fine", "function_overlap", [p.function for p in fine], fy, fl, cfg)]
    comparisons = {}
    usable = [p for p in fine if not math.isnan(p.function) and not math.isnan(p.weight_rms)]
    if len(usable) >= 3:
        comparisons["fine: rho(function overlap) - rho(RMS cosine)"] = compare_predictors(
            [p.function for p in usable], [p.weight_rms for p in usable], [p.change.value for p in usable],
            cfg.analysis.bootstrap_resamples, cfg.analysis.bootstrap_seed)
    return fits, comparisons


def _degradation(ch: _Changes, cfg: StudyConfig, sums) -> list[DegradationPoint]:
    out = [DegradationPoint(1, Interval(0.0, 0.0, 0.0), 0.0, 0.0, len(cfg.domains) * len(cfg.seeds))]
    for k in sorted({len(s) for s in sums}):
        groups = [(f"sum:{'+'.join(s)}", f"single:{d}", d, seed) for s in sums if len(s) == k for d in s for seed in cfg.seeds]
        single = [ch.pooled([g]).value for g in groups]
        out.append(DegradationPoint(k, ch.pooled(groups), _mean(single), max(single), len(groups)))
    return out


def _unlearning(ch: _Changes, cfg: StudyConfig, deltas) -> list[UnlearnResult]:
    doms, out = list(cfg.domains), []
    all_label = f"sum:{'+'.join(doms)}"
    for d in doms:
        rest = [e for e in doms if e != d]
        rest_label = f"sum:{'+'.join(rest)}" if len(rest) >= 2 else f"single:{rest[0]}"
        diffs = [_subtraction_error(deltas, seed, doms, d) for seed in cfg.seeds]
        ppl = {"base": ch.ppl("base", d), "single": ch.ppl(f"single:{d}", d), "unlearned": ch.ppl(f"unlearn:{d}", d),
               "sum_all": ch.ppl(all_label, d) if (all_label, cfg.seeds[0]) in ch.records else math.nan}
        # the unlearned sum and the sum built without the block, on the remaining domains (where both are scored)
        match = [abs(ch.ppl(f"unlearn:{d}", e) / ch.ppl(rest_label, e) - 1) for e in rest
                 if e in ch.records[(rest_label, cfg.seeds[0])]["domains"]]
        ppl["max_rel_diff_vs_sum_without"] = max(match) if match else math.nan
        has_all = (all_label, cfg.seeds[0]) in ch.records
        out.append(UnlearnResult(
            domain=d, ppl=ppl, vs_base=ch.change(f"unlearn:{d}", "base", [d], ref_seedless=True),
            vs_sum_all=ch.change(f"unlearn:{d}", all_label, [d]) if has_all else Interval(math.nan, math.nan, math.nan),
            others_vs_sum_all={e: ch.change(f"unlearn:{d}", all_label, [e]) for e in rest} if has_all else {},
            delta_rel_diff=max(diffs)))
    return out


def _subtraction_error(deltas, seed: int, doms: Sequence[str], d: str) -> float:
    """``|(sum of all - block d) - (sum without d)|_F / |sum without d|_F``, exactly in factored form."""
    blocks = [Block(name=e) for e in doms] + [Block(name=f"-{d}", weight=-1.0)] + \
             [Block(name=f"~{e}", weight=-1.0) for e in doms if e != d]
    srcs = [deltas[(seed, (e,))] for e in doms] + [deltas[(seed, (d,))]] + [deltas[(seed, (e,))] for e in doms if e != d]
    diff = compose(make_recipe(blocks, rank="minimal"), srcs)
    without = [deltas[(seed, (e,))] for e in doms if e != d]
    den = math.sqrt(sum(algebra.frobenius_norm(x) ** 2 for x in algebra.add(without).values()))
    return math.sqrt(sum(diff.report.norm_sq.values())) / den if den else math.nan


def _methods(ch: _Changes, cfg: StudyConfig, sums, merged_sets, fits: Mapping) -> list[MethodResult]:
    out = []
    for spec in cfg.methods:
        for s in [s for s in sums if len(s) <= (cfg.methods_max_size or len(s))]:
            lab, slab = f"{spec.label}:{'+'.join(s)}", f"sum:{'+'.join(s)}"
            vs_sum = {d: ch.change(lab, slab, [d]) for d in s} | {"joint": ch.change(lab, slab, s)}
            vs_merged = None
            if s in merged_sets:
                mlab = f"merged:{'+'.join(s)}"
                vs_merged = {d: ch.change(lab, mlab, [d]) for d in s} | {"joint": ch.change(lab, mlab, s)}
            fit = fits.get((spec.label, s, cfg.seeds[0]))
            out.append(MethodResult(spec.label, tuple(s), vs_sum, vs_merged,
                                    {k: v for k, v in fit.items() if k != "history"} if fit else None))
    return out


def _pairs(cfg: StudyConfig, overlap: Mapping, fine: Sequence[FinePoint]) -> list[PairResult]:
    doms, out = list(cfg.domains), []
    near = {frozenset(p) for p in cfg.analysis.near_pairs}
    for i, a in enumerate(doms):
        for j in range(i + 1, len(doms)):
            b = doms[j]
            fo = overlap.get("interference")
            pts = [p.change.value for p in fine if set(p.subset) == {a, b}]
            out.append(PairResult(a, b, frozenset((a, b)) in near, overlap["rms_cosine"][i][j], overlap["mean_cosine"][i][j],
                                  (fo[i][j] + fo[j][i]) / 2 if fo else math.nan, _mean(pts)))
    return out


def _training(trained) -> list[dict[str, Any]]:
    return [{"seed": seed, "subset": list(subset), "path": str(trained.paths[(seed, subset)]),
             "loss_curve": rec.get("loss_curve", []), "validation": rec.get("validation", []),
             "precision": rec.get("precision"),
             "seconds": rec.get("train_seconds", 0.0) + rec.get("validation_seconds", 0.0)}
            for (seed, subset), rec in trained.records.items()]


def analyse(config: StudyConfig, records: Records, trained, probes: Mapping[int, dict], fits: Mapping,
            sums, merged_sets) -> StudyResult:
    """Every number of the report from the evaluation records, the trained deltas and the probes."""
    ch = _Changes(records, config.seeds, config.analysis.bootstrap_resamples, config.analysis.bootstrap_seed)
    deltas = trained.deltas
    result = StudyResult(config=config.model_dump(), domains=list(config.domains))
    result.evaluations = [{k: v for k, v in rec.items() if k != "per_example"} for rec in records.values()]
    result.overlap = _overlap(config, deltas, probes)
    result.subsets = _subsets(ch, config, deltas, probes, sums, merged_sets)
    result.fine = _fine(ch, config, deltas, probes, sums)
    result.fits, result.comparisons = _fits(result.subsets, result.fine, config)
    result.degradation = _degradation(ch, config, sums)
    result.unlearning = _unlearning(ch, config, deltas)
    result.methods = _methods(ch, config, sums, merged_sets, fits)
    result.pairs = _pairs(config, result.overlap, result.fine)
    result.training = _training(trained)
    result.timings = {"training_compute_s": sum(t["seconds"] for t in result.training),
                      "evaluation_compute_s": sum(r.get("seconds", 0.0) for r in records.values())}
    return result
