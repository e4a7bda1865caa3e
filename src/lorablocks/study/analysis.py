"""The study's numbers from its evaluations: changes, overlap, the fit, degradation and unlearning.

Definitions (BRIEF, "Exact definitions"):

* perplexity ``exp(total NLL / counted tokens)``; the joint perplexity of a subset pools the same number
  of examples from each of its domains (the smallest domain's count, first examples in order);
* change vs merged-data training ``100 * (PPL_sum - PPL_merged) / PPL_merged`` per domain and joint;
* RMS cosine of a set: ``sqrt(mean cos_m^2)`` over all pairs and common modules; signed mean beside it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from lorablocks.core import algebra
from lorablocks.core.overlap import overlap_matrices, set_overlap

__all__ = ["joint_perplexity", "pct_change", "linear_fit", "analyse", "PAPER_CHANGES"]

#: Figures reported by the paper (GPT-2 Small; change of the naive sum vs a merged-data LoRA, joint PPL).
PAPER_CHANGES = {("math", "medicine"): -9.10, ("finance", "math"): 4.54, ("finance", "medicine"): 27.56}


def joint_perplexity(per_example: Mapping[str, Sequence[Sequence[float]]], domains: Sequence[str]) -> dict[str, float]:
    """Token-weighted perplexity over ``domains`` with the same number of examples from each."""
    m = min(len(per_example[d]) for d in domains)
    rows = [r for d in domains for r in per_example[d][:m]]
    nll = math.fsum(r[0] for r in rows)
    tokens = sum(int(r[1]) for r in rows)
    return {"perplexity": math.exp(nll / tokens) if tokens else math.nan, "nll": nll, "tokens": tokens,
            "examples": len(rows)}


def pct_change(new: float, ref: float) -> float:
    return 100.0 * (new - ref) / ref


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict[str, Any]:
    """Least-squares line ``y = slope x + intercept`` with Pearson r, R^2 and Spearman rho."""
    n = len(xs)
    out: dict[str, Any] = {"n": n, "slope": None, "intercept": None, "pearson_r": None, "r2": None,
                           "spearman_rho": None}
    if n < 2 or len(set(xs)) < 2:
        return out
    from scipy import stats

    lr = stats.linregress(xs, ys)
    out.update(slope=float(lr.slope), intercept=float(lr.intercept), pearson_r=float(lr.rvalue),
               r2=float(lr.rvalue**2), p_value=float(lr.pvalue))
    if n >= 3 and len(set(ys)) > 1:
        out["spearman_rho"] = float(stats.spearmanr(xs, ys).statistic)
    return out


def analyse(result, evals: Mapping[tuple[str, int | None], dict], deltas, sums, merged_sets, config) -> None:
    """Fill ``result`` (a :class:`lorablocks.study.StudyResult`) from cached evaluation records."""
    domains = list(config.domains)
    seeds = list(config.seeds)

    def ppl(label: str, seed: int | None, d: str) -> float:
        return evals[(label, seed)]["domains"][d]["perplexity"]

    def joint(label: str, seed: int | None, subset: Sequence[str]) -> float:
        return joint_perplexity(evals[(label, seed)]["per_example"], subset)["perplexity"]

    # ---- overlap of the single adapters (per seed, then mean)
    pair_rms: dict[int, list[list[float]]] = {}
    pair_mean: dict[int, list[list[float]]] = {}
    for seed in seeds:
        rms, mean, _ = overlap_matrices([deltas[(seed, (d,))] for d in domains])
        pair_rms[seed], pair_mean[seed] = rms, mean
    n = len(domains)
    result.overlap = {
        "domains": domains,
        "rms_cosine": [[_mean_sd([pair_rms[s][i][j] for s in seeds])[0] for j in range(n)] for i in range(n)],
        "mean_cosine": [[_mean_sd([pair_mean[s][i][j] for s in seeds])[0] for j in range(n)] for i in range(n)],
        "per_seed": {str(s): {"rms_cosine": pair_rms[s], "mean_cosine": pair_mean[s]} for s in seeds},
    }

    # ---- every subset: sum vs merged-data and vs singles
    subsets = []
    for s in sums:
        per_seed = []
        for seed in seeds:
            ov = set_overlap([deltas[(seed, (d,))] for d in s])
            entry: dict[str, Any] = {
                "seed": seed, "rms_cosine": ov.rms_cosine, "mean_cosine": ov.mean_cosine,
                "sum": {**{d: ppl(f"sum:{'+'.join(s)}", seed, d) for d in s},
                        "joint": joint(f"sum:{'+'.join(s)}", seed, s)},
                "single_own": {d: ppl(f"single:{d}", seed, d) for d in s},
                "change_vs_single_pct": {d: pct_change(ppl(f"sum:{'+'.join(s)}", seed, d), ppl(f"single:{d}", seed, d))
                                         for d in s},
            }
            if s in merged_sets:
                lab = f"merged:{'+'.join(s)}"
                entry["merged"] = {**{d: ppl(lab, seed, d) for d in s}, "joint": joint(lab, seed, s)}
                entry["change_vs_merged_pct"] = {k: pct_change(entry["sum"][k], entry["merged"][k]) for k in entry["sum"]}
            per_seed.append(entry)
        agg: dict[str, Any] = {"domains": list(s), "size": len(s), "has_merged": s in merged_sets}
        agg["rms_cosine"], agg["rms_cosine_sd"] = _mean_sd([e["rms_cosine"] for e in per_seed])
        agg["mean_cosine"], _ = _mean_sd([e["mean_cosine"] for e in per_seed])
        for block in ("sum", "merged", "change_vs_merged_pct", "change_vs_single_pct", "single_own"):
            if block in per_seed[0]:
                agg[block] = {k: _mean_sd([e[block][k] for e in per_seed])[0] for k in per_seed[0][block]}
                agg[block + "_sd"] = {k: _mean_sd([e[block][k] for e in per_seed])[1] for k in per_seed[0][block]}
        agg["paper_change_pct"] = PAPER_CHANGES.get(tuple(sorted(s)))
        agg["per_seed"] = per_seed
        subsets.append(agg)
    result.subsets = subsets

    # ---- fit: joint change vs merged against RMS cosine (all subsets with a merged-data adapter)
    points = [{"subset": "+".join(e["domains"]), "seed": p["seed"], "rms_cosine": p["rms_cosine"],
               "change_pct": p["change_vs_merged_pct"]["joint"]}
              for e in subsets if e["has_merged"] for p in e["per_seed"]]
    result.fit = {"x": "rms_cosine", "y": "joint change vs merged-data (%)", "points": points,
                  **linear_fit([p["rms_cosine"] for p in points], [p["change_pct"] for p in points])}

    # ---- degradation vs number of blocks: own-domain change vs the single adapter, averaged
    curve = []
    for k in range(1, len(domains) + 1):
        vals, joint_vals = [], []
        for seed in seeds:
            if k == 1:
                vals += [0.0 for _ in domains]
                continue
            for e in subsets:
                if e["size"] == k:
                    p = next(q for q in e["per_seed"] if q["seed"] == seed)
                    vals += list(p["change_vs_single_pct"].values())
        if not vals:
            continue
        m, sd = _mean_sd(vals)
        curve.append({"blocks": k, "mean_change_vs_single_pct": m, "sd": sd, "max_change_vs_single_pct": max(vals),
                      "n": len(vals)})
    result.degradation = curve

    # ---- unlearning: sum of all minus one
    unl = []
    full = tuple(domains)
    for d in domains:
        rest = tuple(e for e in domains if e != d)
        per_seed = []
        for seed in seeds:
            removed = algebra.add([deltas[(seed, (e,))] for e in domains] + [deltas[(seed, (d,))]],
                                  [1.0] * len(domains) + [-1.0])
            without = algebra.add([deltas[(seed, (e,))] for e in rest])
            diff = algebra.add([removed, without], [1.0, -1.0])
            _, rep = algebra.compress(diff, "minimal")
            num = math.sqrt(sum(rep.norm_sq.values()))
            den = math.sqrt(sum(algebra.frobenius_norm(x) ** 2 for x in without.values()))
            rest_label = f"sum:{'+'.join(rest)}" if len(rest) >= 2 else f"single:{rest[0]}"
            all_label = f"sum:{'+'.join(full)}"
            per_seed.append({
                "seed": seed,
                "forgotten": {"base": ppl("base", None, d), "sum_all": ppl(all_label, seed, d),
                              "unlearned": ppl(f"unlearn:{d}", seed, d), "sum_without": ppl(rest_label, seed, d),
                              "single": ppl(f"single:{d}", seed, d)},
                "others": {e: {"sum_all": ppl(all_label, seed, e), "unlearned": ppl(f"unlearn:{d}", seed, e),
                               "sum_without": ppl(rest_label, seed, e)} for e in rest},
                "delta_rel_diff_vs_sum_without": num / den if den else math.nan,
            })
        f = {k: _mean_sd([p["forgotten"][k] for p in per_seed])[0] for k in per_seed[0]["forgotten"]}
        unl.append({
            "domain": d,
            "forgotten": f,
            # where the forgotten domain's perplexity lands: relative to the base model and to the sum of all
            "forgotten_vs_base_pct": pct_change(f["unlearned"], f["base"]),
            "forgotten_vs_sum_all_pct": pct_change(f["unlearned"], f["sum_all"]),
            "others_change_pct": {e: _mean_sd([pct_change(p["others"][e]["unlearned"], p["others"][e]["sum_all"])
                                               for p in per_seed])[0] for e in rest},
            "max_delta_rel_diff_vs_sum_without": max(p["delta_rel_diff_vs_sum_without"] for p in per_seed),
            "per_seed": per_seed,
        })
    result.unlearning = unl
