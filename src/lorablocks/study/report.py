"""The study report: ``report.md``, PNG plots, ``results.json``, ``results.csv``, resolved config, versions.

Every change is shown with its 95 % paired-bootstrap interval, ``+4.3 % [+1.2, +7.5]``; the summary calls
a difference real only when its interval excludes zero.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path
from typing import Any

from lorablocks.files.outputs import atomic_file, write_json
from lorablocks.study.analysis import StudyResult
from lorablocks.study.stats import Interval

__all__ = ["write_report", "REPORT_SECTIONS"]

#: Headings every report has (the tests check them).
REPORT_SECTIONS = [
    "## Summary",
    "## Setup",
    "## Perplexity per domain",
    "## Naive sum vs merged-data training",
    "## Overlap",
    "## Change vs overlap",
    "## Near and far domains",
    "## Degradation vs number of blocks",
    "## Unlearning",
    "## Composition methods",
    "## Training",
    "## Reproduce",
]


def _f(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _ci(iv: Interval | None) -> str:
    if iv is None or math.isnan(iv.value):
        return "-"
    return iv.format_pct() + (" *" if iv.excludes_zero else "")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _p(v: Any) -> str:
    """A permutation p-value: its smallest value is 1 / (resamples + 1), so very small ones read ``< 0.001``."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return "< 0.001" if v < 0.001 else f"{v:.3f}"


def _real(iv: Interval) -> str:
    if iv.excludes_zero:
        return "better" if iv.value < 0 else "worse"
    return "no different (interval includes 0)"


# ------------------------------------------------------------------------------------------- summary


def _summary_changes(r: StudyResult) -> list[str]:
    lines = []
    paper = [s for s in r.subsets if s.vs_merged is not None]
    if paper:
        worse = sum(s.vs_merged["joint"].excludes_zero and s.vs_merged["joint"].value > 0 for s in paper)
        better = sum(s.vs_merged["joint"].excludes_zero and s.vs_merged["joint"].value < 0 for s in paper)
        lines.append(f"- Naive sum vs merged-data LoRA (joint perplexity) over {len(paper)} subsets: "
                     f"{min(s.vs_merged['joint'].value for s in paper):+.1f} % to "
                     f"{max(s.vs_merged['joint'].value for s in paper):+.1f} %; really worse on {worse}, really "
                     f"better on {better}, no different on {len(paper) - worse - better} (95 % intervals).")
    deg = [d for d in r.degradation if d.blocks >= 2]
    if deg:
        lines.append("- Own-domain perplexity vs the single block, pooled over sums of each size: "
                     + "; ".join(f"{d.blocks} blocks {_ci(d.pooled)}" for d in deg) + ".")
    return lines


def _summary_predictors(r: StudyResult) -> list[str]:
    lines = []
    for fit in r.fits:
        st = fit.stats
        if st.get("slope") is None:
            continue
        lines.append(f"- {fit.level} fit vs {fit.predictor} ({st['n']} points): Spearman rho {_f(st['spearman_rho'])}, "
                     f"Pearson r {_f(st['pearson_r'])} (permutation p {_p(st['permutation_p'])}), slope "
                     f"{st['slope']:.3g} [{st['slope_ci'][0]:.3g}, {st['slope_ci'][1]:.3g}].")
    for name, iv in r.comparisons.items():
        verdict = ("function overlap predicts better" if iv.excludes_zero and iv.value > 0 else
                   "RMS cosine predicts better" if iv.excludes_zero else "neither predicts clearly better")
        lines.append(f"- {name}: {iv.value:+.2f} [{iv.low:+.2f}, {iv.high:+.2f}]: {verdict}.")
    near = [p for p in r.pairs if p.near]
    if near:
        far = [p for p in r.pairs if not p.near]
        for p in near:
            rank = 1 + sum(q.rms_cosine > p.rms_cosine for q in far)
            lines.append(f"- Near pair {p.a}+{p.b}: RMS cosine {p.rms_cosine:.4f} (rank {rank} of {len(far) + 1} pairs), "
                         f"function overlap {_f(p.function_overlap, 4)}, mean own-domain change in their sum "
                         f"{_f(p.mean_change_vs_single, 1)} % (far pairs: "
                         f"{_f(_mean([q.mean_change_vs_single for q in far]), 1)} % on average).")
    return lines


def _summary_rest(r: StudyResult) -> list[str]:
    lines = []
    if r.unlearning:
        lines.append("- Unlearning: the forgotten domain vs the base model "
                     + "; ".join(f"{u.domain} {_ci(u.vs_base)}" for u in r.unlearning)
                     + f"; the subtracted delta equals the sum built without the block to "
                     f"{max(u.delta_rel_diff for u in r.unlearning):.1e} (relative).")
    for label in dict.fromkeys(m.method for m in r.methods):
        rows = [m for m in r.methods if m.method == label]
        wins = [("+".join(m.domains), m.vs_sum["joint"]) for m in rows if m.vs_sum["joint"].excludes_zero and m.vs_sum["joint"].value < 0]
        losses = sum(m.vs_sum["joint"].excludes_zero and m.vs_sum["joint"].value > 0 for m in rows)
        best = min(rows, key=lambda m: m.vs_sum["joint"].value)
        lines.append(f"- {label} vs the naive sum (joint): really better on {len(wins)} of {len(rows)} subsets"
                     + (f" ({', '.join(f'{s} {iv.format_pct()}' for s, iv in wins)})" if wins else "")
                     + f", really worse on {losses}; best {'+'.join(best.domains)} {best.vs_sum['joint'].format_pct()}.")
    return lines


def _mean(values) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


# ------------------------------------------------------------------------------------------- sections


def _setup(r: StudyResult) -> list[str]:
    cfg, t = r.config, r.timings
    return ["## Setup", "",
            f"- model: `{cfg['model']}`; domains: {', '.join(r.domains)}; seeds: {cfg['seeds']}",
            f"- LoRA: rank {cfg['lora']['r']}, alpha {cfg['lora']['alpha']}, targets {cfg['lora']['targets'] or 'model preset'}",
            f"- training: {cfg['train']['steps_per_domain']} optimizer steps per domain (a merged-data adapter of k "
            f"domains gets k times as many, domains balanced), batch {cfg['train']['batch_size']}, learning rate "
            f"{cfg['train']['learning_rate']}, max length {cfg['train']['max_length']}",
            f"- evaluation: `{cfg['eval']['split']}` split, {cfg['eval']['limit'] or 'all'} examples per domain, max length "
            f"{cfg['eval']['max_length']}; perplexity = exp(total answer-token NLL / answer tokens); joint perplexity pools "
            "the same number of examples from each domain; a sum, a method and a merged-data adapter are scored on their "
            "own domains, the base model and the unlearned sums on all, the singles on "
            + ("all" if cfg["eval"].get("singles_on_all", True) else "their own"),
            f"- intervals: 95 % paired bootstrap over test examples ({cfg['analysis']['bootstrap_resamples']} resamples, "
            "stratified by domain and seed); `*` marks an interval that excludes 0",
            f"- compute: training {t.get('training_compute_s', 0) / 60:.1f} min, evaluation "
            f"{t.get('evaluation_compute_s', 0) / 60:.1f} min in all (this invocation {t.get('total_s', 0) / 60:.1f} min)", ""]


def _perplexities(r: StudyResult) -> list[str]:
    labels = list(dict.fromkeys(e["label"] for e in r.evaluations))

    def cell(label: str, d: str) -> str:
        vals = [e["domains"][d]["perplexity"] for e in r.evaluations if e["label"] == label and d in e["domains"]]
        return _f(sum(vals) / len(vals)) if vals else ""
    rows = [[f"`{lab}`", *[cell(lab, d) for d in r.domains]] for lab in labels]
    return ["## Perplexity per domain", "", "Mean over seeds; blank: not scored on that domain. Lower is better.", "",
            _table(["model", *r.domains], rows), ""]


def _vs_merged(r: StudyResult) -> list[str]:
    md = ["## Naive sum vs merged-data training", "",
          "`100 * (PPL_sum - PPL_merged) / PPL_merged`; negative: the sum is better. Paper (GPT-2 Small): "
          "Math+Medicine -9.10 %, Math+Finance +4.54 %, Finance+Medicine +27.56 %.", ""]
    rows = [["+".join(s.domains), _f(s.rms_cosine, 4), _f(s.function_overlap, 4), _f(s.ppl_sum["joint"]),
             _f(s.ppl_merged["joint"]), _ci(s.vs_merged["joint"]),
             "; ".join(f"{d} {_ci(s.vs_merged[d])}" for d in s.domains),
             _f(s.seed_sd_vs_merged), "-" if s.paper_change_pct is None else f"{s.paper_change_pct:+.2f} %"]
            for s in r.subsets if s.vs_merged is not None]
    md += [_table(["subset", "RMS cos", "function overlap", "PPL sum", "PPL merged", "change (joint)",
                   "change per domain", "sd over seeds", "paper"], rows), ""]
    rows = [["+".join(s.domains), "; ".join(f"{d} {_ci(iv)}" for d, iv in s.vs_single.items())] for s in r.subsets]
    return md + ["Each sum on each of its domains vs that domain's single block:", "",
                 _table(["subset", "change vs single block"], rows), ""]


def _overlap_section(r: StudyResult, files: dict) -> list[str]:
    ov, doms = r.overlap, r.domains
    md = ["## Overlap", "", f"![cosine heatmap]({files['heatmap']})", "",
          "Weight overlap: RMS cosine (signed mean cosine) of the single-domain deltas over common modules:", "",
          _table(["", *doms], [[d, *[f"{_f(ov['rms_cosine'][i][j], 4)} ({_f(ov['mean_cosine'][i][j], 4)})"
                                     for j in range(len(doms))]] for i, d in enumerate(doms)]), ""]
    if "interference" in ov:
        md += ["Function overlap I(row -> column): the row block's output energy on the column domain's inputs, "
               "relative to the column's own block (base-model inputs, validation examples):", "",
               _table(["block \\ inputs of", *doms], [[d, *[_f(ov["interference"][i][j], 4) for j in range(len(doms))]]
                                                      for i, d in enumerate(doms)]), ""]
    return md


def _fits_section(r: StudyResult, files: dict) -> list[str]:
    md = ["## Change vs overlap", "", f"![change vs overlap]({files['fit']})", "",
          "Paper level: joint change of each sum vs its merged-data adapter, one point per subset and seed. Fine "
          "level: each domain's change in each sum vs its single block, one point per sum, domain and seed.", ""]
    rows = []
    for fit in r.fits:
        st = fit.stats
        rows.append([fit.level, fit.predictor, str(st["n"]),
                     "-" if st["slope"] is None else f"{st['slope']:.3g} [{st['slope_ci'][0]:.3g}, {st['slope_ci'][1]:.3g}]",
                     _f(st["pearson_r"], 3), _p(st["permutation_p"]), _f(st["r2"], 3), _f(st["spearman_rho"], 3)])
    md += [_table(["level", "predictor", "points", "slope [95 %]", "Pearson r", "permutation p", "R^2", "Spearman rho"], rows), ""]
    for name, iv in r.comparisons.items():
        md += [f"{name}: {iv.value:+.3f} [{iv.low:+.3f}, {iv.high:+.3f}] (bootstrap over points).", ""]
    md += ["Fine points:", "", _table(["sum", "domain", "seed", "change vs single", "RMS cos", "mean cos", "function overlap"],
                                      [["+".join(p.subset), p.domain, str(p.seed), _ci(p.change), _f(p.weight_rms, 4),
                                        _f(p.weight_mean, 4), _f(p.function, 4)] for p in r.fine]), ""]
    return md


def _pairs_section(r: StudyResult) -> list[str]:
    rows = [[f"{p.a}+{p.b}", "near" if p.near else "", _f(p.rms_cosine, 4), _f(p.mean_cosine, 4),
             _f(p.function_overlap, 4), _f(p.mean_change_vs_single, 2)]
            for p in sorted(r.pairs, key=lambda p: -p.rms_cosine)]
    return ["## Near and far domains", "", "Pairs by RMS cosine (highest first); the last column is the mean "
            "own-domain change (%) of the pair's sum vs the single blocks.", "",
            _table(["pair", "", "RMS cos", "mean cos", "function overlap", "change in their sum"], rows), ""]


def _degradation_section(r: StudyResult, files: dict) -> list[str]:
    rows = [[str(d.blocks), _ci(d.pooled), _f(d.mean), _f(d.worst), str(d.n)] for d in r.degradation]
    return ["## Degradation vs number of blocks", "", f"![degradation]({files['degradation']})", "",
            "Own-domain perplexity change of a sum vs each domain's single block, pooled over all sums of that size:", "",
            _table(["blocks", "pooled change [95 %]", "mean of points", "worst point", "points"], rows), ""]


def _unlearning_section(r: StudyResult) -> list[str]:
    rows = [[u.domain, _f(u.ppl["base"]), _f(u.ppl["sum_all"]), _f(u.ppl["unlearned"]),
             f"{u.ppl['max_rel_diff_vs_sum_without']:.1e}",
             _ci(u.vs_sum_all), _ci(u.vs_base), "; ".join(f"{e} {_ci(iv)}" for e, iv in u.others_vs_sum_all.items()),
             f"{u.delta_rel_diff:.1e}"] for u in r.unlearning]
    return ["## Unlearning", "", "From the sum of all blocks subtract one. Its domain's perplexity should return to "
            "the base model's, the others should stay; the subtracted delta must equal the sum built without it (last "
            "column, relative Frobenius difference), and so must the perplexities on the other domains (fifth column).", "",
            _table(["forgotten", "PPL base", "PPL sum of all", "PPL after", "others: PPL vs sum without it", "after vs sum of all",
                    "after vs base", "others vs sum of all", "delta vs sum without"], rows), ""]


def _methods_section(r: StudyResult, files: dict) -> list[str]:
    if not r.methods:
        return ["## Composition methods", "", "Only the naive sum was evaluated (`methods` in the config adds others).", ""]
    rows = [[m.method, "+".join(m.domains), _ci(m.vs_sum["joint"]), _ci(m.vs_merged["joint"]) if m.vs_merged else "-",
             "; ".join(f"{d} {_ci(m.vs_sum[d])}" for d in m.domains)] for m in r.methods]
    md = ["## Composition methods", "", f"![methods]({files['methods']})", "",
          "Each method's combination vs the naive sum and vs the merged-data adapter (negative: better):", "",
          _table(["method", "subset", "vs sum (joint)", "vs merged (joint)", "vs sum per domain"], rows), ""]
    fitted = [m for m in r.methods if m.fit]
    if fitted:
        md += [_table(["method", "subset", "held-out loss start", "held-out loss best", "improved"],
                      [[m.method, "+".join(m.domains), _f(m.fit["heldout_loss_start"], 4), _f(m.fit["heldout_loss_best"], 4),
                        str(m.fit["improved"])] for m in fitted]), ""]
    return md


def _training_section(r: StudyResult, files: dict) -> list[str]:
    rows = [["+".join(t["subset"]), str(t["seed"]), str(len(t["loss_curve"])), str((t.get("precision") or {}).get("used", "-")),
             _f(t["loss_curve"][0].get("loss"), 3) if t["loss_curve"] else "-",
             _f(t["loss_curve"][-1].get("loss"), 3) if t["loss_curve"] else "-",
             " -> ".join(_f(v.get("loss"), 3) for v in t["validation"]) or "-"] for t in r.training]
    return ["## Training", "", f"![training loss]({files['training']})", "",
            _table(["adapter", "seed", "steps", "precision", "first loss", "last loss", "validation loss"], rows), ""]


# ------------------------------------------------------------------------------------------- files


def _jsonable(obj: Any) -> Any:
    """Dataclasses, intervals and tuples as JSON; NaN/inf as null."""
    if isinstance(obj, Interval):
        return _jsonable(obj.to_dict())
    if dataclasses.is_dataclass(obj):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _csv(r: StudyResult) -> str:
    rows = [{"model": e["label"], "kind": e["kind"], "seed": e["seed"], "subset": "+".join(e["subset"]), "domain": d,
             "perplexity": s["perplexity"], "nll": s["nll"], "tokens": s["tokens"], "examples": s["examples"],
             "comparison": "", "change_pct": "", "ci_low": "", "ci_high": ""}
            for e in r.evaluations for d, s in e["domains"].items()]
    for s in r.subsets:
        for what, ivs in (("vs_merged", s.vs_merged or {}), ("vs_single", s.vs_single)):
            rows += [{"model": f"sum:{'+'.join(s.domains)}", "kind": "change", "seed": "", "subset": "+".join(s.domains),
                      "domain": d, "perplexity": "", "nll": "", "tokens": "", "examples": "", "comparison": what,
                      "change_pct": iv.value, "ci_low": iv.low, "ci_high": iv.high} for d, iv in ivs.items()]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["model"])
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_report(result: StudyResult, out: str | Path, command: str = "") -> Path:
    """Write every report file into ``out`` (each atomically; the cache stays)."""
    import yaml

    from lorablocks.study.plots import study_plots

    out = Path(out)
    files = study_plots(result, out)
    md = ["# Naive LoRA summation study", "",
          "Reproduces and extends the experiment of arXiv 2508.11985 (Cao, Truong, Lizarraga, 2025): one LoRA "
          "adapter per domain, their exact sum compared with a LoRA trained on the merged data, overlap as a "
          "predictor of interference, unlearning by subtraction, and composition methods beyond the sum.", "",
          "## Summary", "", *_summary_changes(result), *_summary_predictors(result), *_summary_rest(result), ""]
    md += _setup(result) + _perplexities(result) + _vs_merged(result) + _overlap_section(result, files)
    md += _fits_section(result, files) + _pairs_section(result) + _degradation_section(result, files)
    md += _unlearning_section(result) + _methods_section(result, files) + _training_section(result, files)
    md += ["## Reproduce", "", "```", command or "lorablocks study ...", "```", "",
           "The exact configuration is in `config.yaml`, library versions in `versions.json`, all numbers with their "
           "intervals in `results.json` and `results.csv`; trained adapters in `adapters/`.", "",
           "Versions: " + ", ".join(f"{k} {v}" for k, v in result.versions.items()), ""]
    with atomic_file(out / "report.md", force=True) as fh:
        fh.write("\n".join(md))
    write_json(out / "results.json", _jsonable(result), force=True)
    with atomic_file(out / "results.csv", force=True) as fh:
        fh.write(_csv(result))
    with atomic_file(out / "config.yaml", force=True) as fh:
        yaml.safe_dump(result.config, fh, sort_keys=False)
    write_json(out / "versions.json", result.versions, force=True)
    return out / "report.md"
