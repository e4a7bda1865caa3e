"""The share of the naive sum's gap to merged-data a method closes, and the single blocks' ceiling."""

import math

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
