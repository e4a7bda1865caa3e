"""The report's summary: words that match the evidence (adjusted decisions, k controlled, scope of seeds)."""

from __future__ import annotations

from lorablocks.study.inference import family_floor
from lorablocks.study.report_format import ci, ci_num, f, mean, name, p, share_interval, verdict
from lorablocks.study.results import StudyResult


def _scope(r: StudyResult) -> list[str]:
    if r.inference.get("seeds", 1) > 1:
        return [f"- Scope: {r.inference['seeds']} training seeds; intervals cover test-example and seed noise."]
    return ["- Scope: **one training seed**, so every result below holds *on these trained blocks*: the intervals "
            "cover test-example noise, not training noise, and claims about a method need several seeds."]


def _vs_merged(r: StudyResult) -> list[str]:
    lines = []
    paper = [s for s in r.subsets if s.vs_merged is not None and s.paper_change_pct is not None]
    if paper:
        parts = [f"{'+'.join(s.domains)} {ci(s.vs_merged['joint'])} (Holm p {p(s.vs_merged['joint'].p_adj)}, "
                 f"{verdict(s.vs_merged['joint'])}; paper {s.paper_change_pct:+.2f} %)" for s in paper]
        lines.append("- **Primary** (the paper's subsets), naive sum vs merged-data LoRA, joint perplexity: "
                     + "; ".join(parts) + ".")
    other = [s.vs_merged["joint"] for s in r.subsets if s.vs_merged is not None and s.paper_change_pct is None]
    if other:
        lines.append(f"- Exploratory: naive sum vs merged-data on {len(other)} other subset{'s' * (len(other) != 1)}: "
                     f"{min(iv.value for iv in other):+.1f} % to {max(iv.value for iv in other):+.1f} %; after Holm "
                     f"really worse on {sum(iv.worse for iv in other)}, really better on {sum(iv.better for iv in other)}, "
                     f"no different on {sum(not iv.significant for iv in other)}.")
    for m in r.method_summary:
        lines.append(f"- {m.method} vs merged-data (joint): within the merged-data adapter's interval or better on "
                     f"{m.better + m.no_different} of {m.subsets} subsets (better on {m.better}, no different on "
                     f"{m.no_different}, worse on {m.worse}; Holm within {m.family or 'its family'}).")
    return lines + _gaps(r)


def _gaps(r: StudyResult) -> list[str]:
    lines = []
    for label in dict.fromkeys(m.method for m in r.methods):
        rows = [m for m in r.methods if m.method == label and m.gap is not None and m.gap.closed is not None]
        if not rows:
            continue
        low = min(rows, key=lambda m: m.gap.closed)
        closed, ceiling = [m.gap.closed for m in rows], [m.gap.ceiling for m in rows]
        lines.append(f"- {label}: share of the naive sum's gap to merged-data closed (joint, point estimates) "
                     f"{100 * min(closed):.0f} % to {100 * max(closed):.0f} % over {len(rows)} subsets; the single blocks "
                     f"on their own domains (the ceiling of making each block act as itself) {100 * min(ceiling):.0f} % to "
                     f"{100 * max(ceiling):.0f} %; lowest {'+'.join(low.domains)} "
                     + " ".join(x for x in (f"{100 * low.gap.closed:.0f} %", share_interval(low.gap.interval)) if x)
                     + f" (ceiling {100 * low.gap.ceiling:.0f} %); 95 % intervals of the share in the methods table.")
    return lines


def _degradation(r: StudyResult) -> list[str]:
    lines = []
    for method in dict.fromkeys(d.method for d in r.degradation):
        rows = [d for d in r.degradation if d.method == method]
        lines.append(f"- {method}: own-domain perplexity vs the single block, pooled by block count: "
                     + "; ".join(f"{d.blocks} blocks {ci(d.pooled)}" for d in rows) + ".")
    return lines


def _predictors(r: StudyResult) -> list[str]:
    lines = []
    fine = [x for x in r.fits if x.level == "fine"]
    for pred in dict.fromkeys(x.predictor for x in fine):
        pairs = next((x for x in fine if x.predictor == pred and x.scope == "k = 2"), None)
        ctrl = next((x for x in fine if x.predictor == pred and x.scope == "all sizes, k controlled"), None)
        bits = []
        if pairs is not None:
            bits.append(f"within the pairs (k = 2, {pairs.n} points) rho {ci_num(pairs.rho, 2)}, permutation p "
                        f"{p(pairs.p)}" if pairs.rho else f"within the pairs: {pairs.note}")
        if ctrl is not None:
            bits.append(f"across sizes with k controlled ({ctrl.n} points) partial rho {ci_num(ctrl.rho, 2)}, "
                        f"permutation p {p(ctrl.p)}, Holm p {p(ctrl.p_adj)}"
                        + (f" ({ctrl.note})" if ctrl.note else "") if ctrl.rho else f"k controlled: {ctrl.note}")
        tag = "primary" if pred in r.inference.get("primary_predictors", []) else "exploratory"
        lines.append(f"- Fine fit vs {name(pred)} ({tag}): " + "; ".join(bits) + ".")
    for c in [c for c in r.comparisons if c.get("primary")]:
        iv = c["difference"]
        stronger = c["a"] if iv.value > 0 else c["b"]
        tested = next((x for x in fine if x.predictor == stronger and x.k_controlled and x.family
                       and "primary" in x.family), None)
        if iv.significant and tested is not None and tested.significant:
            words = (f"{name(stronger)} predicts better once k is controlled, on these domains and trained blocks "
                     "(its own fit passes the permutation test; the difference's interval covers test examples)")
        elif iv.significant:
            words = (f"the difference is real over test examples, but {name(stronger)}'s own k-controlled fit does "
                     "not pass the permutation test over domains, so no predictor is declared better")
        else:
            words = "neither predicts clearly better once k is controlled"
        lines.append(f"- Size-controlled comparison (primary), |partial rho| of {name(c['a'])} minus {name(c['b'])}: "
                     f"{ci_num(iv, 2)} (Holm p {p(iv.p_adj)}): {words}.")
    for level in ("paper", "fine"):
        fam = next((x.family for x in r.fits if x.level == level and x.family and "primary" in x.family), None)
        floor = family_floor(r.fits, fam) if fam else None
        if floor is not None and floor > 0.05:
            lines.append(f"- With {len(r.domains)} domains the {level}-level primary family ({fam}) cannot reach "
                         f"0.05 after Holm (its smallest attainable adjusted p is {floor:.3f}): those fits are "
                         "descriptive; more domains are needed for a test.")
    pooled = [x for x in fine if not x.k_controlled and x.rho]
    if pooled:
        lines.append("- Not evidence: pooled over sizes with k NOT controlled, rho is "
                     + ", ".join(f"{name(x.predictor)} {f(x.rho.value)}" for x in pooled)
                     + " (the number of blocks drives both change and some predictors).")
    if "missing" in r.inference:
        lines.append(f"- Missing: {r.inference['missing']}.")
    return lines


def _near(r: StudyResult) -> list[str]:
    lines = []
    far = [q for q in r.pairs if not q.near]
    for q in [q for q in r.pairs if q.near]:
        rms = q.predictors.get("weight_rms", float("nan"))
        rank = 1 + sum(x.predictors.get("weight_rms", 0) > rms for x in far)
        lines.append(f"- Near pair {q.a}+{q.b}: RMS cosine {rms:.4f} (rank {rank} of {len(far) + 1} pairs), "
                     f"mean I {f(q.predictors.get('function_mean'), 4)}, mean own-domain change in their sum "
                     f"{f(q.mean_change_vs_single, 1)} % (far pairs {f(mean([x.mean_change_vs_single for x in far]), 1)} % "
                     "on average); descriptive, one pair.")
    return lines


def _rest(r: StudyResult) -> list[str]:
    lines = []
    if r.unlearning:
        lines.append("- Unlearning: the forgotten domain vs the base model "
                     + "; ".join(f"{u.domain} {ci(u.vs_base)}" for u in r.unlearning)
                     + f"; the subtracted delta equals the sum built without the block to "
                     f"{max(u.delta_rel_diff for u in r.unlearning):.1e} (relative).")
    for label in dict.fromkeys(m.method for m in r.methods):
        ivs = [m.vs_sum["joint"] for m in r.methods if m.method == label]
        lines.append(f"- {label} vs the naive sum (joint, Holm): really better on {sum(iv.better for iv in ivs)} of "
                     f"{len(ivs)} subsets, really worse on {sum(iv.worse for iv in ivs)}.")
    return lines


def summary(r: StudyResult) -> list[str]:
    """The summary's bullet lines. `*` and every "really" are Holm-adjusted decisions within named families."""
    return ["## Summary", "", *_scope(r), *_vs_merged(r), *_degradation(r), *_predictors(r), *_near(r), *_rest(r),
            "", "`*` and \"really\": Holm-adjusted p < 0.05 within the test's family (see Statistical method).", ""]
