"""The report's sections after the summary (each a list of Markdown lines)."""

from __future__ import annotations

from lorablocks.study.report_format import ci, ci_num, f, name, p, share_interval, table, verdict
from lorablocks.study.results import MethodResult, StudyResult


def setup(r: StudyResult) -> list[str]:
    cfg, t = r.config, r.timings
    return ["## Setup", "",
            f"- model: `{cfg['model']}`; domains: {', '.join(r.domains)}; seeds: {cfg['seeds']}",
            f"- LoRA: rank {cfg['lora']['r']}, alpha {cfg['lora']['alpha']}, targets {cfg['lora']['targets'] or 'model preset'}",
            f"- training: {cfg['train']['steps_per_domain']} optimizer steps per domain ({_merged_budget(cfg['train'])}, "
            f"domains balanced), batch {cfg['train']['batch_size']}, learning rate "
            f"{cfg['train']['learning_rate']}, max length {cfg['train']['max_length']}",
            f"- evaluation: `{cfg['eval']['split']}` split, {cfg['eval']['limit'] or 'all'} examples per domain, max length "
            f"{cfg['eval']['max_length']}; perplexity = exp(total answer-token NLL / answer tokens); joint perplexity pools "
            "the same number of examples from each domain; a sum, a method and a merged-data adapter are scored on their "
            "own domains, the base model and the unlearned sums on all, the singles on "
            + ("all" if cfg["eval"].get("singles_on_all", True) else "their own"),
            f"- intervals: 95 % bootstrap ({cfg['analysis']['bootstrap_resamples']} resamples) shaped like the design "
            "(see Statistical method); `*` marks a Holm-adjusted decision",
            f"- compute: training {t.get('training_compute_s', 0) / 60:.1f} min, evaluation "
            f"{t.get('evaluation_compute_s', 0) / 60:.1f} min in all", ""]


def perplexities(r: StudyResult) -> list[str]:
    labels = list(dict.fromkeys(e["label"] for e in r.evaluations))

    def cell(label: str, d: str) -> str:
        vals = [e["domains"][d]["perplexity"] for e in r.evaluations if e["label"] == label and d in e["domains"]]
        return f(sum(vals) / len(vals)) if vals else ""
    rows = [[f"`{lab}`", *[cell(lab, d) for d in r.domains]] for lab in labels]
    return ["## Perplexity per domain", "", "Mean over seeds; blank: not scored on that domain. Lower is better.", "",
            table(["model", *r.domains], rows), ""]


def vs_merged(r: StudyResult) -> list[str]:
    md = ["## Naive sum vs merged-data training", "",
          "`100 * (PPL_sum - PPL_merged) / PPL_merged`, seeds pooled; negative: the sum is better. Paper (GPT-2 Small): "
          "Math+Medicine -9.10 %, Math+Finance +4.54 %, Finance+Medicine +27.56 %. The paper's subsets are the primary "
          "family, the others exploratory.", ""]
    rows = [["+".join(s.domains), "primary" if s.paper_change_pct is not None else "exploratory",
             f(s.predictors.get("weight_rms"), 4), f(s.predictors.get("function_mean"), 4), f(s.ppl_sum["joint"]),
             f(s.ppl_merged["joint"]), ci(s.vs_merged["joint"]), p(s.vs_merged["joint"].p_adj),
             "; ".join(f"{d} {ci(s.vs_merged[d])}" for d in s.domains), f(s.seed_sd_vs_merged),
             "-" if s.paper_change_pct is None else f"{s.paper_change_pct:+.2f} %"]
            for s in r.subsets if s.vs_merged is not None]
    md += [table(["subset", "family", "RMS cos", "mean I", "PPL sum", "PPL merged", "change (joint)", "Holm p",
                  "change per domain", "sd over seeds", "paper"], rows), ""]
    rows = [["+".join(s.domains), "; ".join(f"{d} {ci(iv)}" for d, iv in s.vs_single.items())] for s in r.subsets]
    return md + ["Each sum on each of its domains vs that domain's single block (one Holm family, exploratory):", "",
                 table(["subset", "change vs single block"], rows), ""]


def overlap(r: StudyResult, files: dict) -> list[str]:
    ov, doms = r.overlap, r.domains
    md = ["## Overlap", "", f"![cosine heatmap]({files['heatmap']})", "",
          "Weight overlap: RMS cosine (signed mean cosine) of the single-domain deltas over common modules:", "",
          table(["", *doms], [[d, *[f"{f(ov['rms_cosine'][i][j], 4)} ({f(ov['mean_cosine'][i][j], 4)})"
                                    for j in range(len(doms))]] for i, d in enumerate(doms)]), ""]
    if "interference" in ov:
        md += ["Function overlap I(row -> column): the row block's output energy on the column domain's inputs, "
               "relative to the column's own block (base-model inputs, validation examples; positions counted: "
               f"{', '.join(ov.get('probe_tokens', []))}); in brackets the functional cosine of the row block with the "
               "column's (directional):", "",
               table(["block \\ inputs of", *doms],
                     [[d, *[f"{f(ov['interference'][i][j], 4)} ({f(ov['functional_cosine'][j][i], 3)})"
                            for j in range(len(doms))]] for i, d in enumerate(doms)]), ""]
    return md


def fits(r: StudyResult, files: dict) -> list[str]:
    md = ["## Change vs overlap", "", f"![change vs overlap]({files['fit']})", "",
          "Paper level: joint change of each sum vs its merged-data adapter, one point per subset (seeds pooled). Fine "
          "level: each domain's change in each sum vs its single block, one point per sum and domain (seeds pooled). "
          "Fits within each block count k, and across sizes with k as a factor (partial Spearman rho; slope of "
          "`y ~ x + factor(k)`); the pooled rows (k NOT controlled) are shown for reference only and belong to no "
          "family. p: permutation of the domain labels, every predictor recomputed; intervals: the joint bootstrap "
          "over test examples, every point recomputed (conditional on these domains and trained blocks).", ""]
    made = [x for x in r.fits if x.rho is not None]
    rows = [[x.level, name(x.predictor), x.scope, str(x.n), ci_num(x.rho), ci_num(x.slope, 3), p(x.p), p(x.p_adj),
             x.note or ("exploratory" if x.family and "exploratory" in x.family else "")] for x in made]
    md += [table(["level", "predictor", "scope", "points", "rho [95 %]", "slope [95 %]", "permutation p", "Holm p",
                  "note"], rows), ""]
    skipped = {}
    for x in r.fits:
        if x.rho is None:
            skipped.setdefault(f"{x.level} level, {x.scope}", x.note)
    if skipped:
        md += ["No fit: " + "; ".join(f"{where} ({why})" for where, why in skipped.items()) + ".", ""]
    for c in r.comparisons:
        md += [f"Size-controlled comparison: |partial rho| of {name(c['a'])} minus {name(c['b'])}: "
               f"{ci_num(c['difference'])} (bootstrap p {p(c['difference'].p)}, Holm p {p(c['difference'].p_adj)}).", ""]
    names = list(r.fine[0].predictors) if r.fine else []
    md += ["Fine points:", "", table(["sum", "domain", "k", "change vs single", *[name(n) for n in names]],
                                     [["+".join(q.subset), q.domain, str(q.blocks), ci(q.change),
                                       *[f(q.predictors[n], 4) for n in names]] for q in r.fine]), ""]
    return md


def pairs(r: StudyResult) -> list[str]:
    rows = [[f"{q.a}+{q.b}", "near" if q.near else "", *[f(q.predictors.get(n), 4) for n in q.predictors],
             f(q.mean_change_vs_single, 2)] for q in sorted(r.pairs, key=lambda q: -q.predictors.get("weight_rms", 0))]
    names = list(r.pairs[0].predictors) if r.pairs else []
    return ["## Near and far domains", "", "Pairs by RMS cosine (highest first); the last column is the mean "
            "own-domain change (%) of the pair's sum vs the single blocks.", "",
            table(["pair", "", *[name(n) for n in names], "change in their sum"], rows), ""]


def degradation(r: StudyResult, files: dict) -> list[str]:
    rows = [[d.method, str(d.blocks), ci(d.pooled), p(d.pooled.p_adj), f(d.mean), f(d.worst), str(d.n)]
            for d in r.degradation]
    return ["## Degradation vs number of blocks", "", f"![degradation]({files['degradation']})", "",
            "Own-domain perplexity change of each method's combination vs each domain's single block, pooled over all "
            "its combinations of that size (Holm within each method):", "",
            table(["method", "blocks", "pooled change [95 %]", "Holm p", "mean of points", "worst point", "points"], rows), ""]


def unlearning(r: StudyResult) -> list[str]:
    rows = [[u.domain, f(u.ppl["base"]), f(u.ppl["sum_all"]), f(u.ppl["unlearned"]),
             f"{u.ppl['max_rel_diff_vs_sum_without']:.1e}",
             ci(u.vs_sum_all), ci(u.vs_base), "; ".join(f"{e} {ci(iv)}" for e, iv in u.others_vs_sum_all.items()),
             f"{u.delta_rel_diff:.1e}", "; ".join(f"{m} {ci(iv)}" for m, iv in u.by_method.items()) or "-"]
            for u in r.unlearning]
    return ["## Unlearning", "", "From the sum of all blocks subtract one. Its domain's perplexity should return to "
            "the base model's, the others should stay; the subtracted delta must equal the sum built without it (last "
            "column, relative Frobenius difference), and so must the perplexities on the other domains (fifth column).", "",
            table(["forgotten", "PPL base", "PPL sum of all", "PPL after", "others: PPL vs sum without it",
                   "after vs sum of all", "after vs base", "others vs sum of all", "delta vs sum without",
                   "other methods (recomposed without it) vs base"], rows), ""]


def methods(r: StudyResult, files: dict) -> list[str]:
    if not r.methods:
        return ["## Composition methods", "", "Only the naive sum was evaluated (`methods` in the config adds others).", ""]
    rows = [[m.method, "+".join(m.domains), ci(m.vs_sum["joint"]), p(m.vs_sum["joint"].p_adj),
             ci(m.vs_merged["joint"]) if m.vs_merged else "-",
             verdict(m.vs_merged["joint"]) if m.vs_merged else "-", _gap(m),
             "; ".join(f"{d} {ci(m.vs_sum[d])}" for d in m.domains)] for m in r.methods]
    md = ["## Composition methods", "", f"![methods]({files['methods']})", "",
          "Each method's combination vs the naive sum and vs the merged-data adapter (negative: better; Holm within each "
          "method and reference). *Gap closed*: the share of the naive sum's gap to merged-data (joint perplexity, seed "
          "means, point estimate) the method closes; in brackets the share the single blocks close on their own "
          "domains, the ceiling of any composition that makes each block act as itself on its own inputs:", "",
          table(["method", "subset", "vs sum (joint)", "Holm p", "vs merged (joint)", "vs merged", "gap closed (ceiling)",
                 "vs sum per domain"], rows),
          "", table(["method", "subsets with merged-data", "better", "no different", "worse", "family"],
                    [[m.method, str(m.subsets), str(m.better), str(m.no_different), str(m.worse), m.family]
                     for m in r.method_summary]), ""]
    fitted = [m for m in r.methods if m.fit]
    if fitted:
        md += [table(["method", "subset", "held-out loss start", "held-out loss best", "improved"],
                     [[m.method, "+".join(m.domains), f(m.fit.get("heldout_loss_start"), 4),
                       f(m.fit.get("heldout_loss_best"), 4), str(m.fit.get("improved"))] for m in fitted]), ""]
    return md


def _merged_budget(train: dict) -> str:
    if train.get("merged_updates", "per_domain") == "same":
        return ("a merged-data adapter of k domains gets as many optimizer steps as a single block at k times the batch: "
                "the same updates, the same examples per domain")
    return "a merged-data adapter of k domains gets k times as many steps, the paper's protocol"


def _gap(m: MethodResult) -> str:
    g = m.gap
    if g is None:
        return "-"
    if g.closed is None:
        return "no gap (sum not worse)"
    return " ".join(x for x in (f"{100 * g.closed:.0f} %", share_interval(g.interval), f"({100 * g.ceiling:.0f} %)") if x)


def training(r: StudyResult, files: dict) -> list[str]:
    rows = [["+".join(t["subset"]), str(t["seed"]), str(len(t["loss_curve"])), str((t.get("precision") or {}).get("used", "-")),
             f(t["loss_curve"][0].get("loss"), 3) if t["loss_curve"] else "-",
             f(t["loss_curve"][-1].get("loss"), 3) if t["loss_curve"] else "-",
             " -> ".join(f(v.get("loss"), 3) for v in t["validation"]) or "-"] for t in r.training]
    return ["## Training", "", f"![training loss]({files['training']})", "",
            table(["adapter", "seed", "steps", "precision", "first loss", "last loss", "validation loss"], rows), ""]


def method_notes(r: StudyResult) -> list[str]:
    inf = r.inference
    fams = sorted({iv for iv in _families(r) if iv})
    return ["## Statistical method", "",
            f"- Bootstrap: {inf.get('bootstrap', '-')} ({inf.get('resamples', '-')} resamples); every statistic made of "
            "several changes (pooled degradation, fits, comparisons) is recomputed on the same resamples.",
            f"- Scope: {inf.get('scope', '-')}.",
            f"- Fits: p-value by {inf.get('fit_p_value', '-')}; rho and slope intervals from the joint example "
            "bootstrap (conditional on these domains and trained blocks); fits need at least 4 points; a test whose smallest attainable p exceeds "
            "0.05 gets no decision. Block count is controlled within each k and by k as a factor across sizes; only "
            "the size-controlled comparison may say that one predictor predicts better.",
            f"- Multiplicity: {inf.get('multiplicity', '-')}. Families: " + "; ".join(fams) + ".",
            "- Function overlap: probed on validation examples, never on the scored split (the config refuses "
            "eval.split: validation while anything fits there).", ""]


def _families(r: StudyResult) -> list[str]:
    out = [x.family for x in r.fits]
    out += [s.vs_merged[k].family for s in r.subsets if s.vs_merged for k in s.vs_merged]
    out += [iv.family for s in r.subsets for iv in s.vs_single.values()]
    out += [d.pooled.family for d in r.degradation] + [u.vs_base.family for u in r.unlearning]
    out += [m.vs_sum["joint"].family for m in r.methods] + [c["difference"].family for c in r.comparisons]
    return out
