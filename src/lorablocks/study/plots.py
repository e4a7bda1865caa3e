"""Matplotlib figures (headless Agg backend), each written atomically to a PNG."""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["heatmap"]


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
