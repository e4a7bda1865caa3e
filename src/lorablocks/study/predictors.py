"""Overlap predictors of one domain in one sum, computed from the blocks' overlap matrices (pure).

None of them grows with the number of blocks ``k`` by construction except the foreign energy, which is
judged only with k controlled (:mod:`lorablocks.study.inference`). For domain ``d`` in sum ``S`` with the
other blocks ``O = S - {d}``:

* ``weight_rms``: ``sqrt(mean_{e in O} RMS cos(d, e)^2)`` (weight-space RMS cosine, pooled over pairs);
* ``weight_mean``: ``mean_{e in O}`` signed mean cosine (d, e);
* ``function_mean``: ``mean_{e in O} I(e -> d)`` (energy of each other block on d's inputs, relative to d's);
* ``function_cosine``: ``mean_{e in O}`` functional cosine of ``e`` with ``d`` on d's inputs (directional);
* ``foreign_energy``: ``|sum_{e in O} dW_e X_d|^2 / |dW_d X_d|^2``, cross terms kept (needs the probe's
  pair energies ``E[d][j][k]``);
* ``foreign_cosine``: the functional cosine of ``dW_d X_d`` with ``sum_{e in O} dW_e X_d`` (directional: an
  aligned near block can help, an opposed one hurts).

A subset's predictor (the paper level) is the mean of its domains' predictors. Every function takes a
permutation of the domain labels so the permutation test recomputes the predictors from permuted matrices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lorablocks.study.inference import FitData, domain_permutations
from lorablocks.study.resample import Estimate

__all__ = ["Matrices", "PREDICTORS", "ENERGY_PREDICTORS", "point_predictor", "subset_predictor", "Point", "fit_data"]

#: Predictors from the weight matrices and the probe's pairwise matrices.
PREDICTORS = ("weight_rms", "weight_mean", "function_mean", "function_cosine")
#: Predictors that need the probe's pair energies.
ENERGY_PREDICTORS = ("foreign_energy", "foreign_cosine")


@dataclass(frozen=True)
class Matrices:
    """One seed's overlap matrices in the config's domain order (None: not probed / not stored).

    ``rms[i][j]``, ``mean[i][j]``: weight cosines of blocks i, j; ``interference[j][i] = I(j -> i)``;
    ``cosine[i][j]``: functional cosine of j with i on i's inputs; ``energy[i][j][k]`` pair energies on i's inputs.
    """

    rms: np.ndarray
    mean: np.ndarray
    interference: np.ndarray | None = None
    cosine: np.ndarray | None = None
    energy: np.ndarray | None = None

    @classmethod
    def from_lists(cls, rms, mean, probe: Mapping | None = None) -> "Matrices":
        arr = lambda v: None if v is None else np.asarray(v, dtype=np.float64)  # noqa: E731
        probe = probe or {}
        return cls(arr(rms), arr(mean), arr(probe.get("interference")), arr(probe.get("cosine")), arr(probe.get("energy")))

    def available(self) -> list[str]:
        names = ["weight_rms", "weight_mean"]
        if self.interference is not None:
            names += ["function_mean", "function_cosine"]
        if self.energy is not None:
            names += list(ENERGY_PREDICTORS)
        return names


def point_predictor(m: Matrices, name: str, subset: Sequence[int], d: int, perm: Sequence[int] | None = None) -> float:
    """Predictor ``name`` of domain index ``d`` in the sum of ``subset`` (indices), with the domain labels
    relabelled by ``perm`` (label i takes the data of ``perm[i]``; None: as observed)."""
    p = (lambda i: i) if perm is None else (lambda i: perm[i])  # noqa: E731
    dd, others = p(d), [p(e) for e in subset if e != d]
    if not others:
        return math.nan
    if name == "weight_rms":
        return math.sqrt(float(np.mean([m.rms[dd, e] ** 2 for e in others])))
    if name == "weight_mean":
        return float(np.mean([m.mean[dd, e] for e in others]))
    if name == "function_mean":
        return float(np.mean([m.interference[e, dd] for e in others]))
    if name == "function_cosine":
        return float(np.mean([m.cosine[dd, e] for e in others]))
    E = m.energy[dd]
    own = E[dd, dd]
    foreign = float(E[np.ix_(others, others)].sum())
    if name == "foreign_energy":
        return foreign / own if own > 0 else math.nan
    if name == "foreign_cosine":
        den = math.sqrt(max(own * foreign, 0.0))
        return float(E[dd, others].sum()) / den if den > 0 else math.nan
    raise KeyError(name)


def subset_predictor(m: Matrices, name: str, subset: Sequence[int], perm: Sequence[int] | None = None) -> float:
    """The mean over the subset's domains of their predictor (the paper level: one point per subset)."""
    vals = [point_predictor(m, name, subset, d, perm) for d in subset]
    vals = [v for v in vals if math.isfinite(v)]
    return float(np.mean(vals)) if vals else math.nan


@dataclass(frozen=True)
class Point:
    """A fitted point: its label, the subset (domain indices), the domain (None: the subset as a whole, the
    paper level) and its change (pooled over seeds, with the study's bootstrap replicates)."""

    label: str
    subset: tuple[int, ...]
    domain: int | None
    change: Estimate


class _Values:
    """Predictor values of relabelled points, each computed once from the matrices: under a permutation a
    point's predictor is the observed matrices' predictor of the relabelled subset and domain."""

    def __init__(self, mats: Sequence[Matrices]) -> None:
        self.mats, self.memo = mats, {}

    def get(self, s: int, name: str, pt: Point, perm) -> float:
        subset = tuple(sorted(pt.subset if perm is None else (perm[i] for i in pt.subset)))
        d = pt.domain if perm is None or pt.domain is None else perm[pt.domain]
        key = (s, name, subset, d)
        if key not in self.memo:
            m = self.mats[s]
            self.memo[key] = (subset_predictor(m, name, subset) if d is None else point_predictor(m, name, subset, d))
        return self.memo[key]


def fit_data(points: Sequence[Point], mats: Sequence[Matrices], names: Sequence[str], n_domains: int,
             seed_weights: np.ndarray | None = None, seed: int = 0) -> FitData:
    """The points' changes (replicates with the examples resampled: the joint example bootstrap) and every
    predictor (the mean over seeds), observed and under every permutation of the domain labels.
    ``seed_weights`` (resamples x seeds) would resample the predictors with the seeds; the study passes None:
    its fit intervals are conditional on the trained blocks, and the permutation p-value is the test."""
    perms, exact = domain_permutations(n_domains, seed)
    x, xb, xperm = {}, {}, {}
    values, seeds = _Values(mats), range(len(mats))
    for name in names:
        per_seed = np.array([[values.get(s, name, pt, None) for pt in points] for s in seeds])  # (S, P)
        x[name] = per_seed.mean(axis=0)
        xb[name] = (seed_weights @ per_seed) / len(mats) if seed_weights is not None and len(mats) > 1 else None
        xperm[name] = np.array([[math.fsum(values.get(s, name, pt, q) for s in seeds) / len(mats) for pt in points]
                                for q in perms])
    return FitData(labels=[pt.label for pt in points], y=np.array([pt.change.value for pt in points]),
                   yb=(np.stack([pt.change.boot if seed_weights is not None else pt.change.examples_only
                                 for pt in points], axis=1) if points else np.zeros((0, 0))),
                   k=np.array([len(pt.subset) for pt in points]), x=x, xb=xb, xperm=xperm, exact=exact,
                   n_domains=n_domains)
