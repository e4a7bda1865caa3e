"""Seeded simulations of a study's data with known truth, for the calibration tests.

A study of ``n`` domains: every sum of 2..n blocks is scored on each of its domains, on the same ``m`` test
examples per domain as the single blocks (shared examples: each example has a difficulty every model
sees). The per-token NLL change of domain ``d`` in a sum of ``k`` blocks is
``domain_effect[d] + k_slope * (k - 1) + effect * signal(S, d) + noise``, with seed effects on top when there
are several seeds. The overlap matrices are random (a noise predictor) unless ``effect`` is non-zero, when
the change follows the RMS-cosine predictor. Everything goes through the functions the report uses.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from lorablocks.study.inference import fit_family
from lorablocks.study.predictors import Matrices, Point, fit_data, point_predictor
from lorablocks.study.resample import Resampler


def random_matrices(rng: np.random.Generator, n: int) -> Matrices:
    """Overlap matrices of ``n`` blocks drawn at random (symmetric weight cosines, a PSD energy tensor)."""
    sym = lambda a: (a + a.T) / 2  # noqa: E731
    rms = sym(np.abs(rng.normal(0.05, 0.03, (n, n))))
    mean = sym(rng.normal(0.0, 0.02, (n, n)))
    np.fill_diagonal(rms, 1.0)
    np.fill_diagonal(mean, 1.0)
    energy = []
    for _ in range(n):
        F = rng.normal(0, 1, (n, 6)) * rng.uniform(0.7, 1.3, (n, 1))
        energy.append(F @ F.T)
    energy = np.array(energy)
    inter = np.array([[energy[i][j, j] / energy[i][i, i] for i in range(n)] for j in range(n)])
    cos = np.array([[energy[i][i, j] / math.sqrt(energy[i][i, i] * energy[i][j, j]) for j in range(n)] for i in range(n)])
    return Matrices(rms, mean, inter, cos, energy)


def simulate_fine(seed: int, *, n: int = 4, m: int = 16, seeds: int = 1, k_slope: float = 0.03,
                  domain_sd: float = 0.03, effect: float = 0.0, resamples: int = 400, names=None):
    """One simulated study's fine-level fit data, its fits, and each point's true change (infinite examples,
    mean over seeds)."""
    rng = np.random.default_rng(seed)
    mats = [random_matrices(rng, n) for _ in range(seeds)]
    tokens = {d: rng.integers(8, 40, m).astype(float) for d in range(n)}
    difficulty = {d: rng.normal(2.0, 0.5, m) for d in range(n)}
    dom_effect = rng.normal(0.0, domain_sd, n)
    rs = Resampler({str(d): m for d in range(n)}, seeds, resamples, seed=seed)
    points, truth = [], []
    for k in range(2, n + 1):
        for S in itertools.combinations(range(n), k):
            for d in S:
                new, ref, shifts = [], [], []
                for s in range(seeds):
                    signal = point_predictor(mats[s], "weight_rms", S, d) if effect else 0.0
                    shift = dom_effect[d] + k_slope * (k - 1) + effect * signal + rng.normal(0, 0.01)
                    shifts.append(shift)
                    per_tok = difficulty[d] + rng.normal(0, 0.05, m)
                    ref.append(np.stack([tokens[d] * per_tok, tokens[d]], 1))
                    new.append(np.stack([tokens[d] * (per_tok + shift + rng.normal(0, 0.1, m)), tokens[d]], 1))
                ch = rs.change({str(d): np.array(new)}, {str(d): np.array(ref)}, list(range(seeds)))
                points.append(Point(f"{S}:{d}", S, d, ch))
                truth.append(100 * math.expm1(float(np.mean(shifts))))
    data = fit_data(points, mats, names or ["weight_rms", "function_mean", "foreign_energy"], n, None, seed)  # as the study
    return data, fit_family(data, "fine"), np.array(truth)
