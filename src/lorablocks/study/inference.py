"""Fits of change against overlap that respect the design: block count controlled, domains as the units.

* **Block count.** A sum of ``k`` blocks hurts more as ``k`` grows, and so does any predictor that adds up
  over the other blocks; pooled over sizes the two correlate through ``k`` alone. Every fit is therefore
  reported within each block count, and across sizes as a **partial Spearman correlation with k as a
  factor** (ranks of x and y over all points, demeaned within each k, then correlated) and a slope from
  ``y ~ x + factor(k)``. The pooled correlation is shown only as "k not controlled".
* **p-values by permuting domain labels** (QAP / Mantel): the points come from a handful of blocks and test
  sets, so they are not independent; under the null that overlap is unrelated to interference the domain
  labels of the overlap matrices are exchangeable. Every predictor is recomputed from the permuted matrices
  (all ``n!`` permutations when ``n! <= 5040``, else 9,999 random ones) and p is the share of permutations
  whose statistic is at least as extreme as the observed one (the identity included: exact, never 0).
  With 3 domains (6 permutations) no p-value can reach 0.05, which the report says.
* **Intervals** on rho and slope from the study's joint bootstrap (:mod:`lorablocks.study.resample`): every
  point's change is recomputed on the same resampled examples (and seeds). They are conditional on these
  domains: the permutation p-value is the test.
* **Multiplicity**: :func:`holm` adjusts a family of p-values (Holm's step-down, family-wise 5 %).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lorablocks.study.resample import Interval, bootstrap_p

__all__ = ["MIN_POINTS", "FitData", "FitStats", "domain_permutations", "fit_family", "family_floor", "compare", "holm",
           "spearman", "partial_spearman", "controlled_slope"]

#: Fewer points than this get no fit: a correlation of 3 points means nothing.
MIN_POINTS = 4
#: Up to this many permutations are enumerated (7 domains), beyond it 9,999 are drawn.
MAX_EXACT = 5040


def _ranks(v: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank, from 1) along the last axis."""
    from scipy.stats import rankdata

    return rankdata(np.asarray(v, dtype=np.float64), axis=-1)


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r along the last axis (broadcasting), NaN where either side is constant."""
    a, b = np.broadcast_arrays(a, b)
    ac, bc = a - a.mean(axis=-1, keepdims=True), b - b.mean(axis=-1, keepdims=True)
    den = np.sqrt((ac * ac).sum(axis=-1) * (bc * bc).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 1e-12 * np.maximum(1.0, np.abs(ac).max(axis=-1) * np.abs(bc).max(axis=-1)),
                        (ac * bc).sum(axis=-1) / np.where(den > 0, den, 1.0), np.nan)


def _demean(v: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``v`` minus its mean within each group of ``k`` (along the last axis)."""
    out = np.array(v, dtype=np.float64, copy=True)
    for g in np.unique(k):
        sel = k == g
        out[..., sel] -= out[..., sel].mean(axis=-1, keepdims=True)
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return _corr(_ranks(x), _ranks(y))


def partial_spearman(x: np.ndarray, y: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Rank correlation of x and y with the block count ``k`` as a factor (ranks demeaned within each k)."""
    return _corr(_demean(_ranks(x), k), _demean(_ranks(y), k))


def _slope(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x, y = np.broadcast_arrays(x, y)
    xc, yc = x - x.mean(axis=-1, keepdims=True), y - y.mean(axis=-1, keepdims=True)
    den = (xc * xc).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (xc * yc).sum(axis=-1) / np.where(den > 0, den, 1.0), np.nan)


def controlled_slope(x: np.ndarray, y: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Slope of x in ``y ~ x + factor(k)`` (x and y demeaned within each k)."""
    x, y = np.broadcast_arrays(x, y)
    xc, yc = _demean(x, k), _demean(y, k)
    den = (xc * xc).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (xc * yc).sum(axis=-1) / np.where(den > 0, den, 1.0), np.nan)


def domain_permutations(n: int, seed: int = 0) -> tuple[list[tuple[int, ...]], bool]:
    """Every permutation of ``n`` domain labels (identity first), or the identity and 9,999 random ones."""
    if math.factorial(n) <= MAX_EXACT:
        return list(itertools.permutations(range(n))), True
    rng = np.random.default_rng(seed)
    return [tuple(range(n))] + [tuple(int(i) for i in rng.permutation(n)) for _ in range(9_999)], False


@dataclass
class FitData:
    """The points of one fit: change ``y`` (point and bootstrap replicates ``yb``, resamples x points), block
    count ``k``, and each predictor's values: observed ``x[name]``, resampled ``xb[name]`` (None: fixed) and
    recomputed under each domain permutation ``xperm[name]`` (permutations x points, identity first)."""

    labels: list[str]
    y: np.ndarray
    yb: np.ndarray
    k: np.ndarray
    x: dict[str, np.ndarray]
    xb: dict[str, np.ndarray | None]
    xperm: dict[str, np.ndarray]
    exact: bool
    n_domains: int


@dataclass
class FitStats:
    """One fit: its scope, whether k is controlled, rho and slope with bootstrap intervals, the permutation p."""

    level: str
    predictor: str
    scope: str
    k_controlled: bool
    n: int
    rho: Interval | None
    slope: Interval | None
    p: float | None
    p_method: str
    p_adj: float | None = None
    family: str | None = None
    note: str = ""
    p_floor: float | None = None

    @property
    def significant(self) -> bool:
        return self.p_adj is not None and self.p_adj < 0.05


def _stats(kind: str, x, y, k):
    if kind == "controlled":
        return partial_spearman(x, y, k), controlled_slope(x, y, k)
    return spearman(x, y), _slope(x, y)


def _usable(x: np.ndarray, k: np.ndarray, kind: str) -> str:
    """Why a fit cannot be made on these points ('' when it can)."""
    if len(x) < MIN_POINTS:
        return f"too few points ({len(x)} < {MIN_POINTS}): no fit"
    if kind == "controlled" and len(x) - len(np.unique(k)) < MIN_POINTS - 1:
        return f"too few points beyond one per block count ({len(x)} points, {len(np.unique(k))} sizes): no fit"
    if len(np.unique(x)) < 3:
        return "the predictor takes fewer than 3 distinct values here: no fit"
    return ""


def _fit_one(data: FitData, name: str, sel: np.ndarray, kind: str, level: str, scope: str) -> FitStats:
    x, y, k = data.x[name][sel], data.y[sel], data.k[sel]
    why = _usable(x, k, kind)
    n_perm = data.xperm[name].shape[0]
    if why:
        return FitStats(level, name, scope, kind != "pooled", int(sel.sum()), None, None, None, "-", note=why)
    rho, slope = (float(v) for v in _stats(kind, x, y, k))
    xb = data.xb.get(name)
    brho, bslope = _stats(kind, x if xb is None else xb[:, sel], data.yb[:, sel], k)
    prho, _ = _stats(kind, data.xperm[name][:, sel], y, k)
    prho = np.where(np.isfinite(prho), prho, 0.0)
    extreme = np.sum(np.abs(prho) >= abs(rho) - 1e-12) if math.isfinite(rho) else 0
    p = extreme / n_perm  # the identity is among the permutations: p >= 1 / n_perm, never 0
    how = (f"exact: all {n_perm} permutations of the {data.n_domains} domain labels" if data.exact
           else f"{n_perm} permutations of the {data.n_domains} domain labels (identity and random)")
    note = ""
    finite = np.abs(prho)
    p_min = float(np.sum(finite >= finite.max() - 1e-12)) / n_perm
    if p_min > 0.05:
        note = (f"the smallest p these {n_perm} permutations of {data.n_domains} domains allow here is {p_min:.3f}: "
                "it cannot reach 0.05, no decision")

    def iv(point: float, boot: np.ndarray) -> Interval:
        b = boot[np.isfinite(boot)]
        if not math.isfinite(point) or len(b) < 0.5 * len(boot):
            return Interval(point, math.nan, math.nan)
        lo, hi = np.percentile(b, [2.5, 97.5])
        return Interval(point, float(lo), float(hi))
    return FitStats(level, name, scope, kind != "pooled", int(sel.sum()), iv(rho, brho), iv(slope, bslope),
                    None if not math.isfinite(rho) else float(p), how, note=note, p_floor=p_min)


def fit_family(data: FitData, level: str, primary: Sequence[str] | None = None) -> list[FitStats]:
    """Every predictor's fits: across sizes with k controlled, within each block count, and pooled (k not
    controlled, for reference, in no family). Two Holm families: the ``primary`` predictors' k-controlled fits
    (across sizes; with a single size, at that size), and everything else tested (exploratory)."""
    out: list[FitStats] = []
    sizes = sorted(set(int(v) for v in data.k))
    every = np.ones(len(data.y), dtype=bool)
    for name in data.x:
        if len(sizes) > 1:
            out.append(_fit_one(data, name, every, "controlled", level, "all sizes, k controlled"))
        for size in sizes:
            out.append(_fit_one(data, name, data.k == size, "within", level, f"k = {size}"))
        if len(sizes) > 1:
            out.append(_fit_one(data, name, every, "pooled", level, "all sizes, k NOT controlled"))
    primary = list(data.x) if primary is None else [n for n in primary if n in data.x]
    main = [f for f in out if (f.scope == "all sizes, k controlled" if len(sizes) > 1 else f.scope.startswith("k = "))]
    families = {f"{level} level, primary predictors ({', '.join(primary)}), k controlled":
                [f for f in main if f.predictor in primary],
                f"{level} level, other predictors and within-k fits (exploratory)":
                [f for f in out if f.k_controlled and not (f in main and f.predictor in primary)]}
    for family, fits in families.items():
        tested = [f for f in fits if f.p is not None and not f.note]
        for f, adj in zip(tested, holm([f.p for f in tested])):
            f.p_adj, f.family = adj, family
    return out


def family_floor(fits: Sequence[FitStats], family: str) -> float | None:
    """The smallest Holm-adjusted p the family's tests can reach (its size times their smallest p)."""
    members = [f for f in fits if f.family == family and f.p_floor is not None]
    return min(1.0, len(members) * min(f.p_floor for f in members)) if members else None


def compare(data: FitData, a: str, b: str) -> Interval | None:
    """``|partial rho(a)| - |partial rho(b)|`` (k as a factor) with its joint-bootstrap interval and p."""
    ok = np.isfinite(data.x[a]) & np.isfinite(data.x[b])
    if _usable(data.x[a][ok], data.k[ok], "controlled") or _usable(data.x[b][ok], data.k[ok], "controlled"):
        return None
    k, y, yb = data.k[ok], data.y[ok], data.yb[:, ok]

    def strength(name: str, yy) -> np.ndarray:
        xb = data.xb.get(name)
        x = data.x[name][ok] if xb is None or yy is y else xb[:, ok]
        return np.abs(partial_spearman(x, yy, k))
    point = float(strength(a, y) - strength(b, y))
    boot = strength(a, yb) - strength(b, yb)
    fin = boot[np.isfinite(boot)]
    if not len(fin):
        return Interval(point, math.nan, math.nan)
    lo, hi = np.percentile(fin, [2.5, 97.5])
    return Interval(point, float(lo), float(hi), bootstrap_p(fin))


def holm(ps: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (family-wise error); None entries stay None and do not count."""
    idx = [i for i, p in enumerate(ps) if p is not None and math.isfinite(p)]
    m = len(idx)
    out: list[float | None] = [None] * len(ps)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: ps[i])):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def adjust(intervals: dict, family: str) -> dict:
    """The intervals of ``intervals`` (key -> Interval) with Holm-adjusted p within ``family``."""
    keys = list(intervals)
    adj = holm([intervals[k].p for k in keys])
    return {k: Interval(intervals[k].value, intervals[k].low, intervals[k].high, intervals[k].p, a, family)
            for k, a in zip(keys, adj)}

