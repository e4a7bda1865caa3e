"""The study's uncertainty: bootstrap intervals with known answers, shared resamples, permutation p-values,
rank statistics with k as a factor, Holm (hand-computed values)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lorablocks.study.inference import (FitData, controlled_slope, domain_permutations, fit_family, holm,
                                        partial_spearman, spearman)
from lorablocks.study.resample import Resampler, bootstrap_p
from lorablocks.study.stats import paired_change


def test_identical_models_have_a_zero_change_and_a_zero_width_interval():
    rows = [[(2.0, 4), (3.0, 5), (1.0, 2)]]
    iv = paired_change(rows, rows)
    assert iv.value == iv.low == iv.high == 0.0 and not iv.excludes_zero


def test_a_constant_per_token_shift_is_exact():
    # every example's NLL per token is higher by log(1.1): PPL ratio exactly 1.1 on every resample
    ref = [[(1.0 * t, t) for t in (3, 5, 7, 11)], [(0.5 * t, t) for t in (2, 4)]]
    new = [[(nll + math.log(1.1) * t, t) for nll, t in g] for g in ref]
    iv = paired_change(new, ref, resamples=500)
    assert iv.value == pytest.approx(10.0) and iv.low == pytest.approx(10.0) and iv.high == pytest.approx(10.0)
    assert iv.excludes_zero and iv.format_pct() == "+10.0 % [+10.0, +10.0]"


def test_interval_matches_the_analytic_normal_case():
    # equal token counts: the change is driven by the mean NLL difference d; its sd is sd(d)/sqrt(n)
    rng = np.random.default_rng(1)
    n = 400
    base = rng.normal(2.0, 0.5, n)
    diff = rng.normal(0.05, 0.2, n)
    ref = [[(b, 1) for b in base]]
    new = [[(b + d, 1) for b, d in zip(base, diff)]]
    iv = paired_change(new, ref, resamples=20_000, seed=3)
    se = diff.std(ddof=1) / math.sqrt(n)
    want_low, want_high = 100 * math.expm1(diff.mean() - 1.96 * se), 100 * math.expm1(diff.mean() + 1.96 * se)
    assert iv.low == pytest.approx(want_low, abs=0.15) and iv.high == pytest.approx(want_high, abs=0.15)
    assert iv.low < iv.value < iv.high


def test_interval_ends_are_stable_between_seeds_to_a_tenth_of_a_point():
    rng = np.random.default_rng(7)
    tokens = rng.integers(5, 80, 100)
    ref = [[(float(t * rng.normal(1.5, 0.4)), int(t)) for t in tokens]]
    new = [[(nll + t * rng.normal(0.04, 0.1), t) for nll, t in ref[0]]]
    a, b = paired_change(new, ref, seed=1), paired_change(new, ref, seed=2)
    assert abs(a.low - b.low) < 0.1 and abs(a.high - b.high) < 0.1


def test_groups_must_pair():
    with pytest.raises(ValueError):
        paired_change([[(1.0, 1)]], [[(1.0, 1), (2.0, 1)]])


def test_models_on_one_domain_share_the_resampled_examples():
    # two sums scored on the same examples: their resampled changes move together (correlated), and a
    # change pooled over both equals the one computed from the summed rows
    rng = np.random.default_rng(0)
    tok = rng.integers(5, 30, 40).astype(float)
    ref = np.stack([tok * rng.normal(2, 0.5, 40), tok], 1)[None]
    hard = rng.normal(0, 0.3, 40)  # examples every model finds hard
    a = ref.copy(); a[0, :, 0] += tok * (0.05 + hard)
    b = ref.copy(); b[0, :, 0] += tok * (0.02 + hard)
    rs = Resampler({"d": 40}, 1, 2000, seed=1)
    ea, eb = rs.change({"d": a}, {"d": ref}, [0]), rs.change({"d": b}, {"d": ref}, [0])
    assert np.corrcoef(ea.boot, eb.boot)[0, 1] > 0.9
    pooled = rs.pooled([("d", a, ref), ("d", b, ref)], [0])
    both = np.concatenate([a, b], axis=1), np.concatenate([ref, ref], axis=1)
    assert pooled.value == pytest.approx(100 * math.expm1((both[0][0, :, 0].sum() - both[1][0, :, 0].sum())
                                                          / both[0][0, :, 1].sum()))


def test_spearman_and_partial_spearman_by_hand():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    k = np.array([2, 2, 2, 3, 3, 3])
    y = np.array([1.0, 3.0, 2.0, 10.0, 30.0, 20.0])
    assert float(spearman(x, y)) == pytest.approx(1 - 6 * (0 + 1 + 1 + 0 + 1 + 1) / (6 * 35))
    # within each k: ranks (1, 3, 2) against (1, 2, 3): demeaned (-1, 1, 0) . (-1, 0, 1) = 1 of 2 -> 0.5
    assert float(partial_spearman(x, y, k)) == pytest.approx(0.5)
    # k drives both y and x; within each k their orders are unrelated: pooled rho high, partial rho low
    y2 = np.array([1.0, 2.0, 3.0, 11.0, 12.0, 13.0])
    x2 = k + np.array([0.0, 0.2, 0.1, 0.1, 0.2, 0.0])  # ranks 1, 3, 2, 5, 6, 4
    assert float(spearman(x2, y2)) == pytest.approx(1 - 6 * (0 + 1 + 1 + 1 + 1 + 4) / (6 * 35))
    # within each k, demeaned ranks (-1, 1, 0) and (0, 1, -1) against y's (-1, 0, 1): 1 + (-1) = 0
    assert float(partial_spearman(x2, y2, k)) == pytest.approx(0.0)
    # y ~ x + factor(k): within-k slope exactly 2 although the groups' levels differ by 100
    xs = np.array([0.0, 1, 2, 0, 1, 2])
    assert float(controlled_slope(xs, 2 * xs + 100 * (k == 3), k)) == pytest.approx(2.0)


def test_holm_by_hand():
    # sorted 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> raised to 0.06 (step-down is monotone)
    adj = holm([0.01, 0.04, 0.03, None])
    assert adj[:3] == pytest.approx([0.03, 0.06, 0.06]) and adj[3] is None
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])


def test_bootstrap_p():
    assert bootstrap_p(np.array([1.0, 2.0, 3.0])) == pytest.approx(2 * 1 / 4)
    assert bootstrap_p(np.linspace(-1, 1, 1001)) == pytest.approx(1.0)


def test_domain_permutations_are_enumerated_and_the_p_value_is_exact():
    perms, exact = domain_permutations(4)
    assert exact and len(perms) == 24 and perms[0] == (0, 1, 2, 3) and len(set(perms)) == 24
    # 4 points whose predictor relabels with the domains: only the identity and one other ordering reach |rho| = 1
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    xperm = np.array([[x[list(p)].tolist()[i] if i < 4 else x[i] for i in range(6)] for p in perms])
    data = FitData(labels=[str(i) for i in range(6)], y=x * 2, yb=np.tile(x * 2, (50, 1)), k=np.full(6, 2),
                   x={"w": x}, xb={"w": None}, xperm={"w": xperm}, exact=True, n_domains=4)
    fit = next(f for f in fit_family(data, "fine") if f.scope == "k = 2")
    assert fit.rho.value == pytest.approx(1.0) and fit.rho.low == fit.rho.high == pytest.approx(1.0)
    assert fit.p == pytest.approx(1 / 24) and "exact: all 24 permutations" in fit.p_method
    assert fit.p_adj == pytest.approx(1 / 24) and fit.k_controlled


def test_too_few_points_give_no_fit():
    data = FitData(labels=["a", "b", "c"], y=np.array([1.0, 2, 3]), yb=np.ones((5, 3)), k=np.full(3, 2),
                   x={"w": np.array([1.0, 2, 3])}, xb={"w": None}, xperm={"w": np.ones((6, 3))}, exact=True, n_domains=3)
    fit = fit_family(data, "paper")[0]
    assert fit.rho is None and fit.p is None and "too few points" in fit.note
