"""The study's numbers from its evaluations: changes with design-shaped intervals, fits, families.

Definitions (BRIEF, "Exact definitions"):

* perplexity ``exp(total NLL / counted tokens)``; the joint perplexity of a subset pools the same number
  of examples from each of its domains (the smallest domain's count, first examples in order);
* change ``100 * (PPL_new - PPL_ref) / PPL_ref``, per domain and joint, pooled over seeds, with the interval
  of :class:`lorablocks.study.resample.Resampler` (one resample of each domain's examples shared by every
  model, seed and sum scored on it; seeds resampled too when there are several);
* predictors of a domain in a sum (:mod:`lorablocks.study.predictors`), none growing with the number of
  blocks by construction except the foreign energy; fits (:mod:`lorablocks.study.inference`) within each
  block count and across sizes with k as a factor, p-values by permuting domain labels;
* every family of tests is Holm-adjusted; the paper's three subsets vs merged-data are the primary family.

Two fit levels: the paper's (joint change of each sum vs its merged-data adapter, one point per subset,
seeds pooled) and a fine one (each domain's change in each sum vs its single adapter, one point per sum and
domain, seeds pooled).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lorablocks.study.config import StudyConfig
from lorablocks.study.inference import adjust, compare, fit_family
from lorablocks.study.predictors import Matrices, Point, fit_data, subset_predictor
from lorablocks.study.resample import Estimate, Interval, Resampler, ratio_interval
from lorablocks.study.results import (DegradationPoint, FinePoint, GapClosed, Inputs, MethodResult, MethodSummary,
                                      PairResult, Records, StudyResult, SubsetResult, UnlearnResult)

__all__ = ["PAPER_CHANGES", "SubsetResult", "MethodResult", "FinePoint", "DegradationPoint", "MethodSummary",
           "UnlearnResult", "PairResult", "StudyResult", "Inputs", "analyse", "analyse_inputs", "joint_perplexity"]

#: Figures reported by the paper (GPT-2 Small; change of the naive sum vs a merged-data LoRA, joint PPL).
PAPER_CHANGES = {("math", "medicine"): -9.10, ("finance", "math"): 4.54, ("finance", "medicine"): 27.56}
PRIMARY = "primary: the paper's subsets, naive sum vs merged-data (joint)"


def joint_perplexity(per_example: Mapping[str, Sequence[Sequence[float]]], domains: Sequence[str]) -> float:
    """Token-weighted perplexity over ``domains`` with the same number of examples from each."""
    m = min(len(per_example[d]) for d in domains)
    rows = [r for d in domains for r in per_example[d][:m]]
    tokens = sum(int(r[1]) for r in rows)
    return math.exp(math.fsum(r[0] for r in rows) / tokens) if tokens else math.nan


# ------------------------------------------------------------------------------------------- changes


class _Changes:
    """Changes between evaluations with the study's shared resampler, pooling seeds."""

    def __init__(self, records: Records, seeds: Sequence[int], resampler: Resampler) -> None:
        self.records, self.seeds, self.rs = records, list(seeds), resampler

    def has(self, label: str) -> bool:
        return (label, self.seeds[0]) in self.records

    def series(self, label: str, domain: str, m: int | None, seedless: bool = False) -> np.ndarray:
        keys = [None] * len(self.seeds) if seedless else self.seeds
        rows = [self.records[(label, s)]["per_example"][domain] for s in keys]
        m = min(len(r) for r in rows) if m is None else m
        return np.asarray([r[:m] for r in rows], dtype=np.float64).reshape(len(rows), m, 2)

    def joint_length(self, label: str, domains: Sequence[str]) -> int | None:
        """Examples per domain a joint change over ``domains`` uses (the fewest ``label`` has; None: one domain)."""
        return min(len(self.records[(label, self.seeds[0])]["per_example"][d]) for d in domains) if len(domains) > 1 else None

    def estimate(self, new: str, ref: str, domains: Sequence[str], ref_seedless: bool = False) -> Estimate:
        m = self.joint_length(new, domains)
        return self.rs.change({d: self.series(new, d, m) for d in domains},
                              {d: self.series(ref, d, m, ref_seedless) for d in domains}, range(len(self.seeds)))

    def change(self, new: str, ref: str, domains: Sequence[str], ref_seedless: bool = False) -> Interval:
        return self.estimate(new, ref, domains, ref_seedless).interval()

    def pooled(self, groups: Sequence[tuple[str, str, str]], m: int | None = None) -> Estimate:
        """One change pooled over ``(new label, ref label, domain)`` groups (seeds pooled; the first ``m`` examples
        of each domain, default all)."""
        return self.rs.pooled([(d, self.series(n, d, m), self.series(r, d, m)) for n, r, d in groups],
                              range(len(self.seeds)))

    def ppl(self, label: str, domain: str) -> float:
        vals = [self.records[(label, s)]["domains"][domain]["perplexity"] for s in self.seeds
                if (label, s) in self.records and domain in self.records[(label, s)]["domains"]]
        if not vals and (label, None) in self.records:
            vals = [self.records[(label, None)]["domains"][domain]["perplexity"]]
        return statistics.fmean(vals) if vals else math.nan

    def joint(self, label: str, domains: Sequence[str]) -> float:
        return statistics.fmean(joint_perplexity(self.records[(label, s)]["per_example"], domains) for s in self.seeds)


def _resampler(records: Records, cfg: StudyConfig) -> Resampler:
    sizes: dict[str, int] = {}
    for rec in records.values():
        for d, rows in rec["per_example"].items():
            sizes[d] = max(sizes.get(d, 0), len(rows))
    return Resampler(sizes, len(cfg.seeds), cfg.analysis.bootstrap_resamples, cfg.analysis.bootstrap_seed)


def _tag(s: Sequence[str]) -> str:
    return "+".join(s)


# ------------------------------------------------------------------------------------------- overlap


def _matrices(cfg: StudyConfig, deltas: Mapping, probes: Mapping[int, dict]) -> list[Matrices]:
    from lorablocks.core.overlap import overlap_matrices

    out = []
    for s in cfg.seeds:
        rms, mean, _ = overlap_matrices([deltas[(s, (d,))] for d in cfg.domains])
        out.append(Matrices.from_lists(rms, mean, probes.get(s)))
    return out


def _overlap(cfg: StudyConfig, mats: Sequence[Matrices], probes: Mapping[int, dict]) -> dict[str, Any]:
    avg = lambda name: np.mean([getattr(m, name) for m in mats], axis=0).tolist()  # noqa: E731
    out: dict[str, Any] = {"domains": list(cfg.domains), "rms_cosine": avg("rms"), "mean_cosine": avg("mean")}
    if all(m.interference is not None for m in mats):
        out["interference"], out["functional_cosine"] = avg("interference"), avg("cosine")
    out["energy_available"] = all(m.energy is not None for m in mats)
    out["probe_tokens"] = sorted({str(p.get("tokens", "all non-padding (prompt and answer)")) for p in probes.values()})
    return out


def _predictor_names(mats: Sequence[Matrices]) -> list[str]:
    names = mats[0].available()
    return [n for n in names if all(n in m.available() for m in mats)]


def _mean_over_seeds(mats, fn) -> float:
    vals = [fn(m) for m in mats]
    vals = [v for v in vals if math.isfinite(v)]
    return float(np.mean(vals)) if vals else math.nan


# ------------------------------------------------------------------------------------------- analyses


def _subsets(ch: _Changes, cfg: StudyConfig, mats, names, inp: Inputs) -> list[SubsetResult]:
    doms, out = list(cfg.domains), []
    for s in inp.sums:
        lab, idx = f"sum:{_tag(s)}", tuple(doms.index(d) for d in s)
        has = s in inp.merged_sets
        mlab = f"merged:{_tag(s)}"
        vs_merged = ({d: ch.change(lab, mlab, [d]) for d in s} | {"joint": ch.change(lab, mlab, s)}) if has else None
        per_seed = []
        if has and len(cfg.seeds) > 1:
            per_seed = [100 * (joint_perplexity(ch.records[(lab, k)]["per_example"], s)
                               / joint_perplexity(ch.records[(mlab, k)]["per_example"], s) - 1) for k in cfg.seeds]
        out.append(SubsetResult(
            domains=tuple(s), predictors={n: _mean_over_seeds(mats, lambda m, n=n: subset_predictor(m, n, idx)) for n in names},
            ppl_sum={**{d: ch.ppl(lab, d) for d in s}, "joint": ch.joint(lab, s)},
            ppl_merged={**{d: ch.ppl(mlab, d) for d in s}, "joint": ch.joint(mlab, s)} if has else None,
            vs_merged=vs_merged, vs_single={d: ch.change(lab, f"single:{d}", [d]) for d in s},
            seed_sd_vs_merged=statistics.stdev(per_seed) if len(per_seed) > 1 else None,
            paper_change_pct=PAPER_CHANGES.get(tuple(sorted(s)))))
    return out


def _fine_points(ch: _Changes, cfg: StudyConfig, sums) -> list[Point]:
    doms = list(cfg.domains)
    return [Point(f"{_tag(s)}:{d}", tuple(doms.index(e) for e in s), doms.index(d),
                  ch.estimate(f"sum:{_tag(s)}", f"single:{d}", [d])) for s in sums for d in s]


def _paper_points(ch: _Changes, cfg: StudyConfig, sums, merged_sets) -> list[Point]:
    doms = list(cfg.domains)
    return [Point(_tag(s), tuple(doms.index(e) for e in s), None, ch.estimate(f"sum:{_tag(s)}", f"merged:{_tag(s)}", s))
            for s in sums if s in merged_sets]


def _fits(result: StudyResult, ch: _Changes, cfg: StudyConfig, mats, names, inp: Inputs) -> None:
    """Both levels' fits, the points they are made of, and the size-controlled predictor comparisons."""
    doms = list(cfg.domains)
    seed_w = None  # fit intervals: the joint example bootstrap, conditional on the trained blocks
    primary = primary_predictors(names)
    levels = {"paper": _paper_points(ch, cfg, inp.sums, inp.merged_sets), "fine": _fine_points(ch, cfg, inp.sums)}
    for level, points in levels.items():
        if not points:
            continue
        data = fit_data(points, mats, names, len(doms), seed_w, cfg.analysis.bootstrap_seed)
        result.fits += fit_family(data, level, primary)
        result.fit_points[level] = {"labels": data.labels, "y": data.y.tolist(), "k": data.k.tolist(),
                                    "x": {n: v.tolist() for n, v in data.x.items()}}
        if level == "fine":
            result.fine = [FinePoint(tuple(doms[i] for i in p.subset), doms[p.domain], p.change.interval(),
                                     {n: float(data.x[n][j]) for n in names}) for j, p in enumerate(points)]
            comps = {a: compare(data, a, "weight_rms") for a in names if a.startswith(("function", "foreign"))}
            comps = {a: v for a, v in comps.items() if v is not None}
            what = "fine level, |partial rho| (k as a factor) minus weight_rms's"
            fams = {f"{what}: the primary function predictor": {a: v for a, v in comps.items() if a in primary},
                    f"{what}: other function predictors (exploratory)": {a: v for a, v in comps.items() if a not in primary}}
            for fam, group in fams.items():
                result.comparisons += [{"name": f"{a} vs weight_rms", "a": a, "b": "weight_rms", "primary": a in primary,
                                        "difference": v} for a, v in adjust(group, fam).items()]


def primary_predictors(names: Sequence[str]) -> list[str]:
    """The predictors named before looking at the data: the paper's weight RMS cosine, and the function overlap
    that keeps the cross terms (the foreign energy) or, without the probe's pair energies, the mean I."""
    function = "foreign_energy" if "foreign_energy" in names else "function_mean"
    return [n for n in ("weight_rms", function) if n in names]


def _degradation(ch: _Changes, cfg: StudyConfig, sums) -> list[DegradationPoint]:
    out = []
    for method in ["sum", *[m.label for m in cfg.methods]]:
        rows = []
        for k in sorted({len(s) for s in sums}):
            groups = [(f"{method}:{_tag(s)}", f"single:{d}", d) for s in sums if len(s) == k
                      and ch.has(f"{method}:{_tag(s)}") for d in s]
            if not groups:
                continue
            single = [ch.pooled([g]).value for g in groups]
            rows.append((k, ch.pooled(groups).interval(), float(np.mean(single)), max(single), len(groups)))
        ivs = adjust({k: iv for k, iv, *_ in rows}, f"{method}: own-domain change vs single blocks by block count")
        out += [DegradationPoint(method, k, ivs[k], mean, worst, n) for k, _, mean, worst, n in rows]
    return out


def _unlearning(ch: _Changes, cfg: StudyConfig, deltas) -> list[UnlearnResult]:
    doms, out = list(cfg.domains), []
    all_label = f"sum:{_tag(doms)}"
    has_all = ch.has(all_label)
    for d in doms:
        rest = [e for e in doms if e != d]
        rest_label = f"sum:{_tag(rest)}" if len(rest) >= 2 else f"single:{rest[0]}"
        diffs = [_subtraction_error(deltas, seed, doms, d) for seed in cfg.seeds]
        ppl = {"base": ch.ppl("base", d), "single": ch.ppl(f"single:{d}", d), "unlearned": ch.ppl(f"unlearn:{d}", d),
               "sum_all": ch.ppl(all_label, d) if has_all else math.nan}
        match = [abs(ch.ppl(f"unlearn:{d}", e) / ch.ppl(rest_label, e) - 1) for e in rest
                 if ch.has(rest_label) and e in ch.records[(rest_label, cfg.seeds[0])]["domains"]]
        ppl["max_rel_diff_vs_sum_without"] = max(match) if match else math.nan
        nan = Interval(math.nan, math.nan, math.nan)
        out.append(UnlearnResult(
            domain=d, ppl=ppl, vs_base=ch.change(f"unlearn:{d}", "base", [d], ref_seedless=True),
            vs_sum_all=ch.change(f"unlearn:{d}", all_label, [d]) if has_all else nan,
            others_vs_sum_all={e: ch.change(f"unlearn:{d}", all_label, [e]) for e in rest} if has_all else {},
            delta_rel_diff=max(diffs)))
    fam = adjust({u.domain: u.vs_base for u in out}, "unlearning: forgotten domain vs the base model")
    for u in out:
        u.vs_base = fam[u.domain]
    for spec in cfg.methods:
        have = {u.domain: ch.change(f"unlearn-{spec.label}:{u.domain}", "base", [u.domain], ref_seedless=True)
                for u in out if ch.has(f"unlearn-{spec.label}:{u.domain}")}
        for d, iv in adjust(have, f"unlearning with {spec.label}: forgotten domain vs the base model").items():
            next(u for u in out if u.domain == d).by_method[spec.label] = iv
    return out


def _subtraction_error(deltas, seed: int, doms: Sequence[str], d: str) -> float:
    """``|(sum of all - block d) - (sum without d)|_F / |sum without d|_F``, exactly in factored form."""
    from lorablocks.compose import Block, compose, make_recipe
    from lorablocks.core import algebra

    blocks = [Block(name=e) for e in doms] + [Block(name=f"-{d}", weight=-1.0)] + \
             [Block(name=f"~{e}", weight=-1.0) for e in doms if e != d]
    srcs = [deltas[(seed, (e,))] for e in doms] + [deltas[(seed, (d,))]] + [deltas[(seed, (e,))] for e in doms if e != d]
    diff = compose(make_recipe(blocks, rank="minimal"), srcs)
    without = [deltas[(seed, (e,))] for e in doms if e != d]
    den = math.sqrt(sum(algebra.frobenius_norm(x) ** 2 for x in algebra.add(without).values()))
    return math.sqrt(sum(diff.report.norm_sq.values())) / den if den else math.nan


def _methods(ch: _Changes, cfg: StudyConfig, inp: Inputs) -> list[MethodResult]:
    out = []
    for spec in cfg.methods:
        for s in [s for s in inp.sums if ch.has(f"{spec.label}:{_tag(s)}")]:
            lab, slab = f"{spec.label}:{_tag(s)}", f"sum:{_tag(s)}"
            vs_sum = {d: ch.change(lab, slab, [d]) for d in s} | {"joint": ch.change(lab, slab, s)}
            vs_merged = None
            if s in inp.merged_sets:
                mlab = f"merged:{_tag(s)}"
                vs_merged = {d: ch.change(lab, mlab, [d]) for d in s} | {"joint": ch.change(lab, mlab, s)}
            fit = inp.fits.get((spec.label, s, cfg.seeds[0]))
            out.append(MethodResult(spec.label, tuple(s), vs_sum, vs_merged,
                                    {k: v for k, v in fit.items() if k != "history"} if fit else None,
                                    _gap(ch, lab, s) if vs_merged is not None else None))
    return out


def _gap(ch: _Changes, label: str, s: Sequence[str]) -> GapClosed | None:
    """The share of the sum's gap to merged-data that ``label`` closes, beside the single blocks' share, with the
    perplexities (seed means) it comes from; ``None`` if a single block was not scored on its domain. With the
    study's resampler the shares are ratios of the pooled joint changes vs the sum (the statistic whose
    bootstrap draws give the interval); without it, of the seed means of joint perplexity."""
    if not all(ch.has(f"single:{d}") for d in s):
        return None
    sum_label, merged_label = f"sum:{_tag(s)}", f"merged:{_tag(s)}"
    j_sum, j_merged, j_method = ch.joint(sum_label, s), ch.joint(merged_label, s), ch.joint(label, s)
    j_singles = statistics.fmean(
        joint_perplexity({d: ch.records[(f"single:{d}", seed)]["per_example"][d] for d in s}, s) for seed in ch.seeds)
    ppl = (j_sum, j_merged, j_method, j_singles)
    if ch.rs is None:
        gap = j_sum - j_merged
        return GapClosed(*ppl, (j_sum - j_method) / gap if gap > 0 else None,
                         (j_sum - j_singles) / gap if gap > 0 else None)
    method, merged = ch.estimate(label, sum_label, s), ch.estimate(merged_label, sum_label, s)
    singles = ch.pooled([(f"single:{d}", sum_label, d) for d in s], ch.joint_length(label, s))
    if not merged.value < 0:  # merged-data is not better than the sum: no gap to close
        return GapClosed(*ppl, None, None)
    return GapClosed(*ppl, method.value / merged.value, singles.value / merged.value,
                     ratio_interval(method.boot, merged.boot))


def _families(result: StudyResult) -> None:
    """Holm within each family; the paper's subsets vs merged-data (joint) are the primary family."""
    subs = {s.domains: s for s in result.subsets}
    primary = {k: s.vs_merged["joint"] for k, s in subs.items() if s.vs_merged and s.paper_change_pct is not None}
    for k, iv in adjust(primary, PRIMARY).items():
        subs[k].vs_merged["joint"] = iv
    other = {k: s.vs_merged["joint"] for k, s in subs.items() if s.vs_merged and k not in primary}
    for k, iv in adjust(other, "naive sum vs merged-data, the other subsets (joint; exploratory)").items():
        subs[k].vs_merged["joint"] = iv
    per_dom = {(k, d): s.vs_merged[d] for k, s in subs.items() if s.vs_merged for d in k}
    for (k, d), iv in adjust(per_dom, "naive sum vs merged-data per domain (exploratory)").items():
        subs[k].vs_merged[d] = iv
    single = {(k, d): iv for k, s in subs.items() for d, iv in s.vs_single.items()}
    for (k, d), iv in adjust(single, "each sum on each domain vs its single block (exploratory)").items():
        subs[k].vs_single[d] = iv
    for label in dict.fromkeys(m.method for m in result.methods):
        rows = [m for m in result.methods if m.method == label]
        for ref in ("vs_sum", "vs_merged"):
            what = "the naive sum" if ref == "vs_sum" else "merged-data"
            have = [m for m in rows if getattr(m, ref)]
            joint = adjust({m.domains: getattr(m, ref)["joint"] for m in have}, f"{label} vs {what} (joint)")
            per = adjust({(m.domains, d): getattr(m, ref)[d] for m in have for d in m.domains},
                         f"{label} vs {what} per domain (exploratory)")
            for m in have:
                getattr(m, ref)["joint"] = joint[m.domains]
                for d in m.domains:
                    getattr(m, ref)[d] = per[(m.domains, d)]


def _method_summary(result: StudyResult) -> list[MethodSummary]:
    """Per method, vs merged-data (joint, adjusted): better / no different (within its interval) / worse."""
    out = []
    sums = [s.vs_merged["joint"] for s in result.subsets if s.vs_merged]
    if sums:
        fams = sorted({iv.family for iv in sums if iv.family})
        out.append(MethodSummary("sum", len(sums), sum(iv.better for iv in sums),
                                 sum(not iv.significant for iv in sums), sum(iv.worse for iv in sums), " + ".join(fams)))
    for label in dict.fromkeys(m.method for m in result.methods):
        ivs = [m.vs_merged["joint"] for m in result.methods if m.method == label and m.vs_merged]
        if ivs:
            out.append(MethodSummary(label, len(ivs), sum(iv.better for iv in ivs), sum(not iv.significant for iv in ivs),
                                     sum(iv.worse for iv in ivs), ivs[0].family or ""))
    return out


def _pairs(cfg: StudyConfig, mats, names, fine: Sequence[FinePoint]) -> list[PairResult]:
    doms, out = list(cfg.domains), []
    near = {frozenset(p) for p in cfg.analysis.near_pairs}
    for i, a in enumerate(doms):
        for j in range(i + 1, len(doms)):
            b = doms[j]
            pts = [p.change.value for p in fine if set(p.subset) == {a, b}]
            out.append(PairResult(a, b, frozenset((a, b)) in near,
                                  {n: _mean_over_seeds(mats, lambda m, n=n: subset_predictor(m, n, (i, j))) for n in names},
                                  float(np.mean(pts)) if pts else math.nan))
    return out


def _inference_notes(cfg: StudyConfig, overlap: Mapping, names: Sequence[str]) -> dict[str, Any]:
    n, seeds = len(cfg.domains), len(cfg.seeds)
    perms = math.factorial(n)
    notes = {"seeds": seeds, "resamples": cfg.analysis.bootstrap_resamples,
             "bootstrap": ("one Poisson(1) weight per test example and resample, shared by every model, seed and sum "
                           "scored on that domain" + ("; seeds resampled with replacement (two-level), seed level "
                                                      "small-sample corrected" if seeds > 1 else "")),
             "scope": ("several seeds: intervals cover test-example and training-seed noise" if seeds > 1 else
                       "one seed: intervals are conditional on these trained blocks (test-example noise only); "
                       "claims about a method need several seeds"),
             "fit_p_value": (f"permutation of the {n} domain labels, every predictor recomputed from the permuted overlap "
                             f"matrices ({'all ' + str(perms) if perms <= 5040 else '9,999 random'} permutations)"),
             "multiplicity": "Holm within each family (named with each test)", "predictors": list(names),
             "primary_predictors": primary_predictors(names)}
    if not overlap.get("energy_available"):
        notes["missing"] = ("foreign_energy and foreign_cosine need the probe's pair energies, which these probe records "
                            "do not hold (probed before they were stored, or probing off); run the study again to probe")
    return notes


def analyse_inputs(config: StudyConfig, inp: Inputs) -> StudyResult:
    """Every number of the report from the analysis inputs."""
    ch = _Changes(inp.records, config.seeds, _resampler(inp.records, config))
    mats = _matrices(config, inp.deltas, inp.probes)
    names = _predictor_names(mats)
    result = StudyResult(config=config.model_dump(), domains=list(config.domains))
    result.evaluations = [{k: v for k, v in rec.items() if k != "per_example"} for rec in inp.records.values()]
    result.overlap = _overlap(config, mats, inp.probes)
    result.subsets = _subsets(ch, config, mats, names, inp)
    _fits(result, ch, config, mats, names, inp)
    result.degradation = _degradation(ch, config, inp.sums)
    result.unlearning = _unlearning(ch, config, inp.deltas)
    result.methods = _methods(ch, config, inp)
    _families(result)
    result.method_summary = _method_summary(result)
    result.pairs = _pairs(config, mats, names, result.fine)
    result.inference = _inference_notes(config, result.overlap, names)
    result.training = list(inp.training)
    result.timings = {"training_compute_s": sum(t.get("seconds", 0.0) for t in result.training),
                      "evaluation_compute_s": sum(r.get("seconds", 0.0) for r in inp.records.values())}
    return result


def training_records(trained) -> list[dict[str, Any]]:
    return [{"seed": seed, "subset": list(subset), "path": str(trained.paths[(seed, subset)]),
             "loss_curve": rec.get("loss_curve", []), "validation": rec.get("validation", []),
             "precision": rec.get("precision"),
             "seconds": rec.get("train_seconds", 0.0) + rec.get("validation_seconds", 0.0)}
            for (seed, subset), rec in trained.records.items()]


def analyse(config: StudyConfig, records: Records, trained, probes: Mapping[int, dict], fits: Mapping,
            sums, merged_sets) -> StudyResult:
    """Every number of the report from the evaluation records, the trained deltas and the probes."""
    return analyse_inputs(config, Inputs(records, trained.deltas, training_records(trained), probes, fits,
                                         list(sums), list(merged_sets)))
