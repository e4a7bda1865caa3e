"""Factored overlap metrics against dense computation and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from lorablocks.core.algebra import LowRank, to_dense
from lorablocks.core.overlap import (
    adapter_stats,
    cosine,
    effective_rank,
    inner,
    overlap_matrices,
    pair_overlap,
    set_overlap,
)
from tests.core.test_algebra import random_delta

torch.set_num_threads(1)


def dense_cos(x: LowRank, y: LowRank) -> float:
    dx, dy = to_dense(x, torch.float64), to_dense(y, torch.float64)
    return float((dx * dy).sum() / (dx.norm() * dy.norm()))


def test_hand_computed_cosines():
    e1 = LowRank(B=torch.tensor([[1.0], [0.0]]), A=torch.tensor([[1.0, 0.0]]))  # [[1,0],[0,0]]
    e2 = LowRank(B=torch.tensor([[0.0], [1.0]]), A=torch.tensor([[0.0, 1.0]]))  # [[0,0],[0,1]]
    both = LowRank(B=torch.eye(2), A=torch.eye(2))  # identity
    assert inner(e1, e2) == 0.0
    assert cosine(e1, e2) == 0.0
    assert cosine(e1, both) == pytest.approx(1 / math.sqrt(2))
    neg = LowRank(B=-e1.B, A=e1.A)
    assert cosine(e1, neg) == pytest.approx(-1.0)
    # pair with two modules: cosines 0 and -1 -> RMS sqrt(1/2), mean -1/2
    p = pair_overlap({"a": e1, "b": e1}, {"a": e2, "b": neg, "c": e1})
    assert p.modules == ["a", "b"]
    assert p.rms_cosine == pytest.approx(math.sqrt(0.5))
    assert p.mean_cosine == pytest.approx(-0.5)


def test_factored_cosine_equals_dense():
    a, b = random_delta(21, rank=3), random_delta(22, rank=5)
    for m in a:
        assert cosine(a[m], b[m]) == pytest.approx(dense_cos(a[m], b[m]), abs=1e-10)
        assert abs(cosine(a[m], b[m])) > 1e-4  # random deltas are not exactly orthogonal


def test_matrices_and_set_overlap_match_dense():
    deltas = [random_delta(30 + i, rank=2 + i) for i in range(3)]
    del deltas[2]["v"]  # module missing in one adapter: its pairs use common modules only
    rms, mean, pairs = overlap_matrices(deltas)
    for i in range(3):
        assert rms[i][i] == 1.0
        for j in range(3):
            if i == j:
                continue
            common = [m for m in deltas[i] if m in deltas[j]]
            cos = [dense_cos(deltas[i][m], deltas[j][m]) for m in common]
            assert rms[i][j] == pytest.approx(math.sqrt(sum(c * c for c in cos) / len(cos)), abs=1e-10)
            assert mean[i][j] == pytest.approx(sum(cos) / len(cos), abs=1e-10)
            assert rms[i][j] == rms[j][i]
    all_cos = [c for p in pairs.pairs.values() for c in p.cosines.values()]
    assert len(all_cos) == 3 + 2 + 2
    assert pairs.rms_cosine == pytest.approx(math.sqrt(sum(c * c for c in all_cos) / len(all_cos)))
    assert set_overlap(deltas).rms_cosine == pytest.approx(pairs.rms_cosine)


def test_effective_rank_and_stats():
    # singular values 3 and 1 -> p = (3/4, 1/4) -> exp(H)
    x = LowRank(B=torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), A=torch.eye(2))
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert effective_rank(x) == pytest.approx(math.exp(h))
    one = LowRank(B=torch.ones(4, 1), A=torch.ones(1, 5))
    assert effective_rank(one) == pytest.approx(1.0)
    stats = adapter_stats({"x": x, "one": one})
    assert stats.norms["x"] == pytest.approx(math.sqrt(10))
    assert stats.ranks == {"x": 2, "one": 1}
    assert stats.total_norm == pytest.approx(math.sqrt(10 + 20))
