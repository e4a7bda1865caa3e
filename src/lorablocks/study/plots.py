"""Matplotlib figures (headless Agg backend), each written atomically to a PNG."""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["heatmap", "study_plots"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike, force: bool) -> None:
    from lorablocks.files.outputs import atomic_file

    with atomic_file(path, force=force, mode="wb") as fh:
        fig.savefig(fh, format="png", dpi=120, bbox_inches="tight")


def heatmap(
    matrix: Sequence[Sequence[float | None]],
    labels: Sequence[str],
    path: str | os.PathLike,
    title: str = "RMS cosine similarity of LoRA deltas",
    force: bool = False,
) -> None:
    """An annotated N x N heatmap (``None`` cells shown blank)."""
    import numpy as np

    plt = _pyplot()
    m = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.0 * n + 2))
    off = m.copy()
    np.fill_diagonal(off, np.nan)
    vmax = np.nanmax(np.abs(off)) if np.isfinite(off).any() else 1.0
    im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=max(vmax, 1e-12))
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    for i in range(n):
        for j in range(n):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.3g}", ha="center", va="center",
                        color="white" if m[i, j] < 0.6 * vmax or i == j else "black", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title)
    _save(fig, path, force)
    plt.close(fig)


def _fit_panel(ax, result, level: str, predictor: str, xlabel: str) -> None:
    """Change vs one predictor, points coloured by block count k, with the within-k and k-controlled rho."""
    pts = result.fit_points.get(level)
    if not pts or predictor not in pts["x"]:
        ax.set_title(f"{xlabel}: no points", fontsize=8)
        return
    x, y, k = pts["x"][predictor], pts["y"], pts["k"]
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for i, size in enumerate(sorted(set(k))):
        sel = [j for j, v in enumerate(k) if v == size]
        fit = next((f for f in result.fits if f.level == level and f.predictor == predictor and f.scope == f"k = {size}"), None)
        rho = f", rho {fit.rho.value:+.2f}" if fit is not None and fit.rho is not None else ""
        ax.scatter([x[j] for j in sel], [y[j] for j in sel], s=14, color=colours[i % len(colours)], zorder=3,
                   label=f"k = {size} ({len(sel)}{rho})")
    ctrl = next((f for f in result.fits if f.level == level and f.predictor == predictor and f.k_controlled
                 and f.scope.startswith("all")), None)
    if ctrl is not None and ctrl.rho is not None:
        ax.set_title(f"k controlled: partial rho {ctrl.rho.value:+.2f}, permutation p {ctrl.p:.3f}", fontsize=8)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.legend(fontsize=6)


def study_plots(result, out) -> dict[str, str]:
    """The report's figures: overlap heatmaps, change vs predictors (coloured by k), degradation, methods, training."""
    from pathlib import Path

    plt = _pyplot()
    out = Path(out)
    files = {"heatmap": "cosine_heatmap.png", "fit": "change_vs_overlap.png", "degradation": "degradation.png",
             "methods": "methods.png", "training": "training_loss.png"}
    heatmap(result.overlap["rms_cosine"], result.domains, out / files["heatmap"],
            title="RMS cosine of single-domain LoRA deltas", force=True)
    energy = "foreign_energy" in (result.fit_points.get("fine") or {}).get("x", {})
    fine_fn = ("foreign_energy", "foreign energy |sum_others dW X|^2 / |dW_d X|^2") if energy else \
        ("function_mean", "mean I(other -> domain)")
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    _fit_panel(axes[0][0], result, "paper", "weight_rms", "RMS cosine of the summed deltas")
    _fit_panel(axes[0][1], result, "paper", "function_mean", "mean function overlap I(j -> i)")
    _fit_panel(axes[1][0], result, "fine", "weight_rms", "RMS cosine of the block with the others")
    _fit_panel(axes[1][1], result, "fine", *fine_fn)
    axes[0][0].set_ylabel("joint PPL change vs merged-data (%)")
    axes[1][0].set_ylabel("own-domain PPL change vs single (%)")
    fig.suptitle("Interference vs weight overlap (left) and function overlap (right); colour: number of blocks k")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    _save(fig, out / files["fit"], True)
    plt.close(fig)
    _degradation_plot(plt, result, out / files["degradation"])
    _methods_plot(plt, result, out / files["methods"])
    _training_plot(plt, result, out / files["training"])
    return files


def _degradation_plot(plt, result, path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    methods = list(dict.fromkeys(d.method for d in result.degradation))
    for i, method in enumerate(methods):
        deg = [d for d in result.degradation if d.method == method]
        shift = (i - (len(methods) - 1) / 2) * 0.06
        ys = [0.0] + [d.pooled.value for d in deg]
        err = [[0.0] + [d.pooled.value - d.pooled.low for d in deg], [0.0] + [d.pooled.high - d.pooled.value for d in deg]]
        ax.errorbar([1 + shift] + [d.blocks + shift for d in deg], ys, yerr=err, marker="o", capsize=3, label=method)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xlabel("number of blocks combined")
    ax.set_ylabel("own-domain PPL change vs single (%), 95 % CI")
    ax.set_title("Degradation vs number of blocks")
    ax.set_xticks(sorted({1} | {d.blocks for d in result.degradation}))
    if methods:
        ax.legend(fontsize=7)
    _save(fig, path, True)
    plt.close(fig)


def _methods_plot(plt, result, path) -> None:
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(result.subsets) + 3), 4))
    methods = list(dict.fromkeys(m.method for m in result.methods))
    subsets = ["+".join(s.domains) for s in result.subsets]
    width = 0.8 / max(len(methods), 1)
    for k, name in enumerate(methods):
        rows = {"+".join(m.domains): m.vs_sum["joint"] for m in result.methods if m.method == name}
        xs = [i + k * width for i, s in enumerate(subsets) if s in rows]
        iv = [rows[s] for s in subsets if s in rows]
        ax.bar(xs, [v.value for v in iv], width, label=name,
               yerr=[[v.value - v.low for v in iv], [v.high - v.value for v in iv]], capsize=2)
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(subsets))], subsets, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("joint PPL change vs naive sum (%)")
    ax.set_title("Composition methods vs the naive sum (negative: better)")
    if methods:
        ax.legend(fontsize=7)
    _save(fig, path, True)
    plt.close(fig)


def _training_plot(plt, result, path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for t in result.training:
        if t["loss_curve"]:
            ax.plot([c.get("step", i) for i, c in enumerate(t["loss_curve"])], [c.get("loss") for c in t["loss_curve"]],
                    label=f"{'+'.join(t['subset'])} (seed {t['seed']})", lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_title("Training loss")
    ax.legend(fontsize=6, ncol=2)
    _save(fig, path, True)
    plt.close(fig)
