"""The delta algebra against hand-computed matrices and algebraic identities on random adapters."""

from __future__ import annotations

import math

import pytest
import torch

from lorablocks.core import algebra
from lorablocks.core.algebra import LowRank, add, compress, lora_scale, negate, scale, subtract, to_dense
from lorablocks.errors import NonFiniteError, ShapeMismatchError

torch.set_num_threads(1)

SHAPES = {"q": (12, 10), "v": (6, 10), "down": (10, 16)}


def random_delta(seed: int, rank: int = 3, shapes=SHAPES, dtype=torch.float32) -> algebra.Delta:
    g = torch.Generator().manual_seed(seed)
    return {
        name: LowRank(B=torch.randn(o, rank, generator=g, dtype=dtype), A=torch.randn(rank, i, generator=g, dtype=dtype))
        for name, (o, i) in shapes.items()
    }


def dense(delta, dtype=torch.float64):
    return {n: to_dense(x, dtype) for n, x in delta.items()}


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


def test_lora_scale_hand_values():
    assert lora_scale(4, 64) == 16.0
    assert lora_scale(16, 32, use_rslora=True) == 8.0
    with pytest.raises(ValueError):
        lora_scale(0, 8)


def test_from_peft_factors_folds_scale():
    A = torch.tensor([[1.0, 2.0]])  # r=1, in=2
    B = torch.tensor([[3.0], [4.0]])  # out=2
    x = algebra.from_peft_factors(A, B, s=0.5)
    expected = torch.tensor([[1.5, 3.0], [2.0, 4.0]])
    assert torch.equal(to_dense(x), expected)


def test_add_hand_computed():
    # dW1 = [[1,0],[0,0]], dW2 = [[0,0],[0,2]]; 2*dW1 - dW2 = [[2,0],[0,-2]]
    x1 = LowRank(B=torch.tensor([[1.0], [0.0]]), A=torch.tensor([[1.0, 0.0]]))
    x2 = LowRank(B=torch.tensor([[0.0], [1.0]]), A=torch.tensor([[0.0, 2.0]]))
    out = add([{"m": x1}, {"m": x2}], [2.0, -1.0])
    assert out["m"].rank == 2
    assert torch.equal(to_dense(out["m"]), torch.tensor([[2.0, 0.0], [0.0, -2.0]]))


def test_add_equals_dense_sum_with_mixed_ranks_modules_and_weights():
    d1 = random_delta(1, rank=2)
    d2 = random_delta(2, rank=5)
    d3 = {k: v for k, v in random_delta(3, rank=4).items() if k != "v"}  # lacks module v
    w = [0.7, -1.3, 2.0]
    out = add([d1, d2, d3], w)
    for name in SHAPES:
        expected = w[0] * to_dense(d1[name], torch.float64) + w[1] * to_dense(d2[name], torch.float64)
        if name in d3:
            expected = expected + w[2] * to_dense(d3[name], torch.float64)
        got = to_dense(out[name], torch.float64)
        assert rel_err(got, expected) < 1e-6
        assert got.norm() > 0
    assert out["v"].rank == 2 + 5 and out["q"].rank == 2 + 5 + 4


def test_weight_one_returns_adapter_and_minus_one_its_negation():
    d = random_delta(4)
    same = add([d], [1.0])
    neg = add([d], [-1.0])
    for name in d:
        assert torch.equal(to_dense(same[name]), to_dense(d[name]))
        assert torch.allclose(to_dense(neg[name]), -to_dense(d[name]))
        assert torch.allclose(to_dense(negate(d)[name]), -to_dense(d[name]))
        assert torch.allclose(to_dense(scale(d, 2.5)[name]), 2.5 * to_dense(d[name]))


def test_a_plus_b_minus_b_is_a_and_cancelled_rank_disappears():
    a, b = random_delta(5, rank=3), random_delta(6, rank=4)
    raw = add([a, b, b], [1.0, 1.0, -1.0])
    assert raw["q"].rank == 3 + 4 + 4
    out, report = compress(raw, "minimal")
    for name in a:
        assert out[name].rank == 3
        assert rel_err(to_dense(out[name], torch.float64), to_dense(a[name], torch.float64)) < 1e-5
    assert report.overall_rel_error < 1e-6


def test_subtract_to_zero_drops_modules():
    a = random_delta(7)
    out, report = compress(subtract(a, a), "minimal")
    assert out == {}
    assert all(r == 0 for r in report.rank_out.values())


def test_minimal_rank_is_exact_and_not_larger_than_concat():
    # rank-deficient inputs: two adapters sharing their A make the concatenation rank-deficient
    a = random_delta(8, rank=4)
    b = {n: LowRank(B=torch.randn(x.B.shape, generator=torch.Generator().manual_seed(9)), A=x.A) for n, x in a.items()}
    total = add([a, b], [1.0, 0.5])
    concat, _ = compress(total, "concat")
    minimal, report = compress(total, "minimal")
    for name in a:
        assert minimal[name].rank <= concat[name].rank
        assert minimal[name].rank == 4  # shared row space of A has rank 4
        assert rel_err(to_dense(minimal[name], torch.float64), to_dense(total[name], torch.float64)) < 1e-5
    assert report.max_rel_error < 1e-6


def test_truncation_error_equals_energy_of_dropped_singular_values():
    total = add([random_delta(10, rank=4), random_delta(11, rank=4)])
    out, report = compress(total, 3)
    for name, x in total.items():
        full = to_dense(x, torch.float64)
        s = torch.linalg.svdvals(full)
        expected_err = math.sqrt(float((s[3:] ** 2).sum() / (s**2).sum()))
        assert out[name].rank == 3
        assert report.rel_error[name] == pytest.approx(expected_err, rel=1e-6)
        measured = rel_err(to_dense(out[name], torch.float64), full)
        assert measured == pytest.approx(expected_err, rel=1e-4)
        assert expected_err > 0.01  # truncation really dropped something
    expected_overall = math.sqrt(sum(report.dropped_sq.values()) / sum(report.norm_sq.values()))
    assert report.overall_rel_error == pytest.approx(expected_overall)


def test_singular_values_match_dense():
    x = random_delta(12, rank=4)["down"]
    s_fact = algebra.singular_values(x)
    s_dense = torch.linalg.svdvals(to_dense(x, torch.float64))[: s_fact.numel()]
    assert torch.allclose(s_fact, s_dense, rtol=1e-5)
    assert algebra.frobenius_norm(x) == pytest.approx(float(to_dense(x, torch.float64).norm()), rel=1e-6)


def test_mixing_factors_is_not_a_sum_and_we_do_not_do_it():
    # The naive "(B1+B2)(A1+A2)" differs from B1A1 + B2A2 by the cross terms; our add matches the latter.
    a, b = random_delta(13, rank=2), random_delta(14, rank=2)
    ours = to_dense(add([a, b])["q"], torch.float64)
    naive = (a["q"].B + b["q"].B).double() @ (a["q"].A + b["q"].A).double()
    true = to_dense(a["q"], torch.float64) + to_dense(b["q"], torch.float64)
    assert rel_err(ours, true) < 1e-6
    assert rel_err(naive, true) > 0.1


def test_shape_mismatch_and_nonfinite_are_refused():
    a = random_delta(15)
    b = random_delta(16, shapes={"q": (12, 11)})
    with pytest.raises(ShapeMismatchError, match="module q"):
        add([a, b])
    bad = random_delta(17)
    bad["v"].A[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="module v"):
        algebra.check_finite(bad)
    with pytest.raises(ShapeMismatchError):
        LowRank(B=torch.zeros(3, 2), A=torch.zeros(3, 4))


def test_compress_rejects_bad_rank_modes():
    with pytest.raises(ValueError):
        compress(random_delta(18), "smallest")
    with pytest.raises(ValueError):
        compress(random_delta(18), 0)
