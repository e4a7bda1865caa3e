"""The study report: ``report.md``, PNG plots, ``results.json``, ``results.csv``, resolved config, versions."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lorablocks.files.outputs import atomic_file, write_json

__all__ = ["write_report", "REPORT_SECTIONS"]

#: Headings every report has (the tests check them).
REPORT_SECTIONS = [
    "## Summary",
    "## Setup",
    "## Perplexity per domain",
    "## Naive sum vs merged-data training",
    "## Overlap",
    "## Change vs RMS cosine",
    "## Degradation vs number of blocks",
    "## Unlearning",
    "## Training",
    "## Reproduce",
]


def _f(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _pct(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.2f} %"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _mean_over_seeds(evaluations: list[dict], label: str, domain: str) -> float:
    vals = [e["domains"][domain]["perplexity"] for e in evaluations if e["label"] == label and domain in e["domains"]]
    return sum(vals) / len(vals) if vals else math.nan


def _plots(result, out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorablocks.study.plots import _save, heatmap

    files = {}
    heatmap(result.overlap["rms_cosine"], result.domains, out / "cosine_heatmap.png",
            title="RMS cosine of single-domain LoRA deltas", force=True)
    files["heatmap"] = "cosine_heatmap.png"

    fit = result.fit
    fig, ax = plt.subplots(figsize=(6, 4.2))
    xs = [p["rms_cosine"] for p in fit["points"]]
    ys = [p["change_pct"] for p in fit["points"]]
    ax.scatter(xs, ys, color="tab:blue", zorder=3)
    for p in fit["points"]:
        ax.annotate(p["subset"], (p["rms_cosine"], p["change_pct"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    if fit.get("slope") is not None:
        lo, hi = min(xs), max(xs)
        ax.plot([lo, hi], [fit["slope"] * lo + fit["intercept"], fit["slope"] * hi + fit["intercept"]],
                color="tab:red", label=f"fit: slope {fit['slope']:.3g}, R² {fit['r2']:.2f}")
        ax.legend(fontsize=8)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xlabel("RMS cosine of the summed deltas")
    ax.set_ylabel("joint PPL change vs merged-data LoRA (%)")
    ax.set_title("Interference vs overlap")
    _save(fig, out / "change_vs_cosine.png", True)
    plt.close(fig)
    files["fit"] = "change_vs_cosine.png"

    fig, ax = plt.subplots(figsize=(6, 4))
    deg = result.degradation
    ax.errorbar([d["blocks"] for d in deg], [d["mean_change_vs_single_pct"] for d in deg],
                yerr=[d["sd"] for d in deg], marker="o", capsize=3)
    ax.set_xlabel("number of blocks in the sum")
    ax.set_ylabel("own-domain PPL change vs single adapter (%)")
    ax.set_title("Degradation vs number of blocks")
    ax.set_xticks([d["blocks"] for d in deg])
    _save(fig, out / "degradation.png", True)
    plt.close(fig)
    files["degradation"] = "degradation.png"

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for t in result.training:
        curve = t["loss_curve"]
        if curve:
            steps = [c.get("step", i) for i, c in enumerate(curve)]
            losses = [c.get("loss") for c in curve]
            ax.plot(steps, losses, label=f"{'+'.join(t['subset'])} (seed {t['seed']})", lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_title("Training loss")
    ax.legend(fontsize=6, ncol=2)
    _save(fig, out / "training_loss.png", True)
    plt.close(fig)
    files["training"] = "training_loss.png"
    return files


def _summary(result) -> list[str]:
    """A few sentences computed from the numbers: when naive summation worked here, when not, and why."""
    lines = []
    merged = [s for s in result.subsets if s["has_merged"]]
    if merged:
        ch = [s["change_vs_merged_pct"]["joint"] for s in merged]
        better = [("+".join(s["domains"])) for s, c in zip(merged, ch) if c < 0]
        lines.append(
            f"- Naive sum vs merged-data LoRA (joint perplexity): {min(ch):+.2f} % to {max(ch):+.2f} % over "
            f"{len(ch)} subsets; the sum was better on {len(better)} ({', '.join(better) or 'none'})."
        )
    n = len(result.domains)
    off = [result.overlap["rms_cosine"][i][j] for i in range(n) for j in range(i + 1, n)]
    off = [v for v in off if v is not None and not math.isnan(v)]
    if off:
        lines.append(f"- Overlap: pairwise RMS cosine of the single-domain deltas {min(off):.3f} to {max(off):.3f} "
                     "(1 = same direction, 0 = orthogonal).")
    fit = result.fit
    if fit.get("slope") is not None:
        caution = " Too few points to be conclusive." if fit["n"] < 6 else ""
        lines.append(f"- Change vs RMS cosine over {fit['n']} points: slope {fit['slope']:.3g} % per unit cosine, "
                     f"Pearson r {_f(fit['pearson_r'], 2)}, Spearman rho {_f(fit['spearman_rho'], 2)}.{caution}")
    deg = [d for d in result.degradation if d["blocks"] >= 2]
    if deg:
        means = [d["mean_change_vs_single_pct"] for d in deg]
        trend = ("grows with" if all(b > a for a, b in zip(means, means[1:])) and means[0] > 0
                 else "does not grow steadily with")
        lines.append(f"- Interference {trend} the number of blocks: own-domain perplexity vs the single adapter "
                     + ", ".join(f"{_pct(d['mean_change_vs_single_pct'])} with {d['blocks']}" for d in deg) + ".")
    if result.unlearning:
        vb = [u["forgotten_vs_base_pct"] for u in result.unlearning]
        diff = max(u["max_delta_rel_diff_vs_sum_without"] for u in result.unlearning)
        lines.append(f"- Unlearning: after subtracting a block its domain's perplexity is {min(vb):+.2f} % to "
                     f"{max(vb):+.2f} % from the base model's; the subtracted delta equals the sum built without "
                     f"the block to {diff:.1e} (relative).")
    return lines


def _finite(obj: Any) -> Any:
    """NaN/inf become null so that results.json is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _csv_rows(result) -> list[dict[str, Any]]:
    rows = []
    for e in result.evaluations:
        for d, s in e["domains"].items():
            rows.append({"model": e["label"], "kind": e["kind"], "seed": e["seed"], "subset": "+".join(e["subset"]),
                         "domain": d, "perplexity": s["perplexity"], "nll": s["nll"], "tokens": s["tokens"],
                         "examples": s["examples"]})
    return rows


def write_report(result, out: str | Path, command: str = "") -> Path:
    """Write every report file into ``out`` (each atomically; the cache stays)."""
    import yaml

    out = Path(out)
    files = _plots(result, out)
    cfg = result.config
    doms = result.domains
    md: list[str] = ["# Naive LoRA summation study", ""]
    md += ["Reproduces the experiment of arXiv 2508.11985 (Cao, Truong, Lizarraga, 2025): one LoRA adapter per "
           "domain, their exact sum compared with a LoRA trained on the merged data, overlap (cosine) as a "
           "predictor of interference, and unlearning by subtraction.", ""]

    md += ["## Summary", "", *_summary(result), ""]
    md += ["## Setup", ""]
    md += [f"- model: `{cfg['model']}`; domains: {', '.join(doms)}; seeds: {cfg['seeds']}",
           f"- LoRA: rank {cfg['lora']['r']}, alpha {cfg['lora']['alpha']}, dropout {cfg['lora']['dropout']}, "
           f"targets {cfg['lora']['targets'] or 'model preset'}",
           f"- training: {cfg['train']['steps_per_domain']} optimizer steps per domain (a merged-data adapter of k "
           f"domains gets k times as many, domains balanced), batch {cfg['train']['batch_size']}, learning rate "
           f"{cfg['train']['learning_rate']}, max length {cfg['train']['max_length']}",
           f"- evaluation: `{cfg['eval']['split']}` split, {cfg['eval']['limit'] or 'all'} examples per domain, "
           f"max length {cfg['eval']['max_length']}; perplexity = exp(total answer-token NLL / answer tokens); joint "
           "perplexity pools the same number of examples from each domain",
           f"- compute: training {result.timings.get('training_compute_s', 0) / 60:.1f} min, evaluation "
           f"{result.timings.get('evaluation_compute_s', 0) / 60:.1f} min in all (this invocation: training "
           f"{result.timings.get('training_s', 0) / 60:.1f} min, evaluation "
           f"{result.timings.get('evaluation_s', 0) / 60:.1f} min; cached stages cost nothing)", ""]

    md += ["## Perplexity per domain", "", "Mean over seeds. Lower is better.", ""]
    labels = []
    for e in result.evaluations:
        if e["label"] not in labels:
            labels.append(e["label"])
    rows = [[f"`{lab}`", *[_f(_mean_over_seeds(result.evaluations, lab, d)) for d in doms]] for lab in labels]
    md += [_table(["model", *doms], rows), ""]

    md += ["## Naive sum vs merged-data training", "",
           "Change of the naive sum's perplexity vs the LoRA trained on the merged data of the same domains: "
           "`100 * (PPL_sum - PPL_merged) / PPL_merged`. Negative: the sum is better. Paper (GPT-2 Small): "
           "Math+Medicine -9.10 %, Math+Finance +4.54 %, Finance+Medicine +27.56 %.", ""]
    rows = []
    for s in result.subsets:
        if not s["has_merged"]:
            continue
        ch = s["change_vs_merged_pct"]
        rows.append(["+".join(s["domains"]), _f(s["rms_cosine"], 4), _f(s["mean_cosine"], 4),
                     _f(s["sum"]["joint"]), _f(s["merged"]["joint"]), _pct(ch["joint"]),
                     ", ".join(f"{d} {_pct(ch[d])}" for d in s["domains"]),
                     _pct(s["paper_change_pct"])])
    md += [_table(["subset", "RMS cos", "mean cos", "PPL sum (joint)", "PPL merged (joint)", "change (joint)",
                   "change per domain", "paper"], rows), ""]
    rows = [["+".join(s["domains"]), ", ".join(f"{d} {_pct(v)}" for d, v in s["change_vs_single_pct"].items())]
            for s in result.subsets]
    md += ["Change of each sum's perplexity on each of its domains vs that domain's single adapter:", "",
           _table(["subset", "change vs single adapter"], rows), ""]

    md += ["## Overlap", "", f"![cosine heatmap]({files['heatmap']})", "",
           "RMS cosine (signed mean cosine) between the single-domain deltas, over their common modules:", ""]
    ov = result.overlap
    rows = [[d, *[f"{_f(ov['rms_cosine'][i][j], 4)} ({_f(ov['mean_cosine'][i][j], 4)})" for j in range(len(doms))]]
            for i, d in enumerate(doms)]
    md += [_table(["", *doms], rows), ""]

    fit = result.fit
    md += ["## Change vs RMS cosine", "", f"![change vs cosine]({files['fit']})", ""]
    if fit.get("slope") is not None:
        md += [f"Least-squares fit over {fit['n']} points: change = {_f(fit['slope'], 3)} x RMS cosine "
               f"{fit['intercept']:+.3f}; Pearson r {_f(fit['pearson_r'], 3)}, R^2 {_f(fit['r2'], 3)}, "
               f"Spearman rho {_f(fit['spearman_rho'], 3)}.", ""]
    else:
        md += [f"Too few distinct points ({fit['n']}) for a fit.", ""]
    md += [_table(["subset", "seed", "RMS cosine", "joint change vs merged"],
                  [[p["subset"], str(p["seed"]), _f(p["rms_cosine"], 4), _pct(p["change_pct"])] for p in fit["points"]]), ""]

    md += ["## Degradation vs number of blocks", "", f"![degradation]({files['degradation']})", "",
           "Own-domain perplexity change of a sum vs each domain's single adapter, over all sums of that size:", ""]
    md += [_table(["blocks", "mean change", "sd", "worst", "n"],
                  [[str(d["blocks"]), _pct(d["mean_change_vs_single_pct"]), _f(d["sd"]),
                    _pct(d["max_change_vs_single_pct"]), str(d["n"])] for d in result.degradation]), ""]

    md += ["## Unlearning", "",
           "From the sum of all blocks subtract one. The forgotten domain's perplexity should rise back to the "
           "base model's (or above, where the remaining blocks interfere with it), the others should stay; the "
           "subtracted delta must equal the sum built without it (relative Frobenius difference, float error).", ""]
    rows = []
    for u in result.unlearning:
        f = u["forgotten"]
        rows.append([u["domain"], _f(f["base"]), _f(f["sum_all"]), _f(f["unlearned"]), _f(f["sum_without"]),
                     _pct(u["forgotten_vs_sum_all_pct"]), _pct(u["forgotten_vs_base_pct"]),
                     ", ".join(f"{e} {_pct(v)}" for e, v in u["others_change_pct"].items()),
                     f"{u['max_delta_rel_diff_vs_sum_without']:.1e}"])
    md += [_table(["forgotten", "PPL base", "PPL sum of all", "PPL after subtracting", "PPL sum without it",
                   "after vs sum of all", "after vs base", "others vs sum of all", "delta vs sum without (rel. diff)"],
                  rows), ""]

    md += ["## Training", "", f"![training loss]({files['training']})", ""]
    md += [_table(["adapter", "seed", "steps", "first loss", "last loss"],
                  [["+".join(t["subset"]), str(t["seed"]), str(len(t["loss_curve"])),
                    _f(t["loss_curve"][0].get("loss"), 3) if t["loss_curve"] else "-",
                    _f(t["loss_curve"][-1].get("loss"), 3) if t["loss_curve"] else "-"] for t in result.training]), ""]

    md += ["## Reproduce", "", "```", command or "lorablocks study ...", "```", "",
           "The exact configuration is in `config.yaml`, library versions in `versions.json`, all numbers in "
           "`results.json` and `results.csv`.", ""]
    md += ["Versions: " + ", ".join(f"{k} {v}" for k, v in result.versions.items()), ""]

    with atomic_file(out / "report.md", force=True) as fh:
        fh.write("\n".join(md))
    payload = _finite(asdict(result))
    write_json(out / "results.json", payload, force=True)
    buf = io.StringIO()
    rows = _csv_rows(result)
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["model"])
    writer.writeheader()
    writer.writerows(rows)
    with atomic_file(out / "results.csv", force=True) as fh:
        fh.write(buf.getvalue())
    with atomic_file(out / "config.yaml", force=True) as fh:
        yaml.safe_dump(result.config, fh, sort_keys=False)
    write_json(out / "versions.json", result.versions, force=True)
    return out / "report.md"
