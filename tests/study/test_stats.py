"""The study's uncertainty: bootstrap intervals with known answers, permutation p-values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lorablocks.study.stats import compare_predictors, fit_with_uncertainty, paired_change


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


def test_permutation_p_value_perfect_and_shuffled():
    x = np.linspace(0, 1, 20)
    perfect = fit_with_uncertainty(x, 3 * x + 1, resamples=2000)
    assert perfect.pearson_r == pytest.approx(1.0) and perfect.slope.value == pytest.approx(3.0)
    assert perfect.permutation_p == pytest.approx(1 / 2001)  # no permutation reaches |r| = 1
    assert perfect.slope.low == pytest.approx(3.0) and perfect.slope.high == pytest.approx(3.0)
    noise = np.random.default_rng(0).permutation(x)
    shuffled = fit_with_uncertainty(x, noise, resamples=2000)
    assert shuffled.permutation_p > 0.05 and shuffled.slope.low < 0 < shuffled.slope.high


def test_too_few_points_give_no_fit():
    assert fit_with_uncertainty([1.0, 2.0], [1.0, 2.0]).slope is None


def test_compare_predictors_prefers_the_monotone_one():
    rng = np.random.default_rng(0)
    y = rng.normal(size=60)
    good = y + rng.normal(scale=0.1, size=60)
    bad = rng.normal(size=60)
    iv = compare_predictors(good, bad, y, resamples=2000)
    assert iv.value > 0.5 and iv.excludes_zero
