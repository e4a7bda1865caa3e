"""The share of the naive sum's gap to merged-data a method closes, and the single blocks' ceiling."""

import math

import numpy as np

import pytest

from lorablocks.study.analysis import _Changes, _gap


def _rec(**per_domain):
    return {"per_example": {d: rows for d, rows in per_domain.items()}}


def _changes(sum_nll: float, merged_nll: float, method_nll: float, single_nll: float) -> _Changes:
    records = {("sum:a+b", 0): _rec(a=[[sum_nll, 5]], b=[[sum_nll, 5]]),
               ("merged:a+b", 0): _rec(a=[[merged_nll, 5]], b=[[merged_nll, 5]]),
               ("regmean:a+b", 0): _rec(a=[[method_nll, 5]], b=[[method_nll, 5]]),
               ("single:a", 0): _rec(a=[[single_nll, 5]]), ("single:b", 0): _rec(b=[[single_nll, 5]])}
    return _Changes(records, [0], resampler=None)


def test_gap_closed_and_ceiling_match_hand_computed_values():
    g = _gap(_changes(10.0, 5.0, 7.5, 6.0), "regmean:a+b", ("a", "b"))
    e = math.exp
    assert g.ppl_sum == pytest.approx(e(2.0)) and g.ppl_merged == pytest.approx(e(1.0))
    assert g.closed == pytest.approx((e(2.0) - e(1.5)) / (e(2.0) - e(1.0)))
    assert g.ceiling == pytest.approx((e(2.0) - e(1.2)) / (e(2.0) - e(1.0)))
    assert 0 < g.closed < g.ceiling < 1


def test_no_gap_when_the_sum_is_not_worse_and_none_without_singles():
    g = _gap(_changes(5.0, 10.0, 7.5, 6.0), "regmean:a+b", ("a", "b"))
    assert g.closed is None and g.ceiling is None and g.ppl_sum < g.ppl_merged
    ch = _changes(10.0, 5.0, 7.5, 6.0)
    del ch.records[("single:b", 0)]
    assert _gap(ch, "regmean:a+b", ("a", "b")) is None


def test_ratio_interval_pairs_the_draws_and_opens_where_the_gap_vanishes():
    from lorablocks.study.resample import ratio_interval

    merged = -np.linspace(1.0, 3.0, 1000)  # merged-data always better than the sum
    low, high = ratio_interval(0.5 * merged, merged)  # the method closes half of every draw's gap
    assert low == pytest.approx(0.5) and high == pytest.approx(0.5)
    low, high = ratio_interval(np.full(1000, -1.0), merged)  # a fixed gain over a varying gap: 1/3 to 1
    assert low == pytest.approx(1 / 2.95, rel=0.02) and high == pytest.approx(1 / 1.05, rel=0.02)
    no_gap = merged.copy()
    no_gap[:100] = 0.5  # 10 % of the draws: merged-data not better than the sum, the method better: no upper bound
    assert ratio_interval(0.5 * merged, no_gap)[1] == math.inf
    assert ratio_interval(np.full(1000, 1.0), no_gap)[0] == -math.inf  # the method worse than the sum there


def test_gap_interval_from_the_shared_resamples_contains_the_point_and_narrows_with_examples():
    from lorablocks.study.resample import Resampler

    def changes(n: int) -> _Changes:
        g = np.random.default_rng(0)
        rows = lambda shift: [[float(5 * (2.0 + shift + 0.3 * z)), 5] for z in g.standard_normal(n)]  # noqa: E731
        per = {"sum": 0.0, "merged": -0.2, "regmean": -0.15}
        records = {(f"{k}:a+b", 0): _rec(a=rows(v), b=rows(v)) for k, v in per.items()}
        records |= {("single:a", 0): _rec(a=rows(-0.18)), ("single:b", 0): _rec(b=rows(-0.18))}
        return _Changes(records, [0], Resampler({"a": n, "b": n}, 1, 2000, 0))

    small, large = (_gap(changes(n), "regmean:a+b", ("a", "b")) for n in (8, 200))
    for g in (small, large):
        assert g.interval[0] <= g.closed <= g.interval[1]
    assert large.interval[1] - large.interval[0] < small.interval[1] - small.interval[0]
    assert _gap(_changes(10.0, 5.0, 7.5, 6.0), "regmean:a+b", ("a", "b")).interval is None  # no resampler


def test_with_several_seeds_the_share_is_the_statistic_whose_draws_give_its_interval():
    from lorablocks.study.resample import Resampler

    g = np.random.default_rng(1)
    levels = {"sum": 0.0, "merged": -0.25, "regmean": -0.1, "single": -0.2}
    records = {}
    for seed, shift in enumerate((0.0, 0.6, -0.4)):  # seeds at quite different levels
        rows = lambda v: [[float(5 * (2.0 + shift + v + 0.2 * z)), 5] for z in g.standard_normal(12)]  # noqa: E731
        for k in ("sum", "merged", "regmean"):
            records[(f"{k}:a+b", seed)] = _rec(a=rows(levels[k]), b=rows(levels[k]))
        records[("single:a", seed)] = _rec(a=rows(levels["single"]))
        records[("single:b", seed)] = _rec(b=rows(levels["single"]))
    ch = _Changes(records, [0, 1, 2], Resampler({"a": 12, "b": 12}, 3, 2000, 0))
    gap = _gap(ch, "regmean:a+b", ("a", "b"))
    method, merged = ch.estimate("regmean:a+b", "sum:a+b", ("a", "b")), ch.estimate("merged:a+b", "sum:a+b", ("a", "b"))
    assert gap.closed == pytest.approx(method.value / merged.value)
    assert gap.interval[0] <= gap.closed <= gap.interval[1]
    assert 0 < gap.closed < gap.ceiling  # the singles are better than regmean here, by construction
