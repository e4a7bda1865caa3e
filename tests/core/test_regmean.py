"""RegMean in factored form against dense float64 references (lorablocks.core.regmean)."""

from __future__ import annotations

import pytest
import torch

from lorablocks.core.algebra import LowRank, to_dense
from lorablocks.core.regmean import RIDGE, InputGram, regmean, regularised, sketch
from lorablocks.errors import CompositionError


def _block(out: int, inp: int, r: int, seed: int) -> LowRank:
    g = torch.Generator().manual_seed(seed)
    return LowRank(B=torch.randn(out, r, generator=g, dtype=torch.float64),
                   A=torch.randn(r, inp, generator=g, dtype=torch.float64))


def _gram(inp: int, tokens: int, seed: int, cols: slice | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, inp, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, inp, dtype=torch.float64)
    if cols is not None:
        mask = torch.zeros(inp, dtype=torch.float64)
        mask[cols] = 1.0
        X = X * mask
    return X.T @ X / tokens


def _dense_reference(parts, grams, alpha):
    Gs = [alpha * G + (1 - alpha) * torch.diag(torch.diagonal(G)) for G in grams]
    M = sum(w * G for (w, _), G in zip(parts, Gs))
    M = M + torch.eye(M.shape[0], dtype=M.dtype) * RIDGE * float(torch.diagonal(M).mean())
    num = sum(w * to_dense(x, torch.float64) @ G for (w, x), G in zip(parts, Gs))
    return num @ torch.linalg.inv(M)


def test_regmean_of_one_block_is_that_block():
    x = _block(7, 9, 3, 0)
    out = regmean([(2.5, x)], [InputGram.exact(_gram(9, 40, 1))], 0.9)
    assert torch.equal(to_dense(out, torch.float64), to_dense(x, torch.float64))


def test_equal_grams_give_the_weighted_mean_of_the_deltas():
    parts = [(1.0, _block(6, 8, 2, 0)), (3.0, _block(6, 8, 3, 1))]
    G = InputGram.exact(_gram(8, 50, 2))
    out = to_dense(regmean(parts, [G, G], 0.9), torch.float64)
    want = (1.0 * to_dense(parts[0][1], torch.float64) + 3.0 * to_dense(parts[1][1], torch.float64)) / 4.0
    assert torch.allclose(out, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, to_dense(parts[0][1], torch.float64) + to_dense(parts[1][1], torch.float64))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_factored_result_equals_dense_float64_reference(alpha):
    parts = [(1.0, _block(10, 12, 2, 0)), (0.7, _block(10, 12, 4, 1)), (2.0, _block(10, 12, 1, 2))]
    grams = [_gram(12, 30 + 5 * i, 10 + i) for i in range(3)]
    out = regmean(parts, [InputGram.exact(G) for G in grams], alpha)
    assert out.rank == 7  # rank sum r_i, factored
    ref = _dense_reference(parts, grams, alpha)
    assert torch.allclose(to_dense(out, torch.float64), ref, atol=1e-6, rtol=0)
    assert not torch.allclose(ref, sum(w * to_dense(x, torch.float64) for w, x in parts), atol=1e-3)


def test_block_whose_inputs_never_touch_the_other_subspace_is_unchanged_on_its_inputs():
    parts = [(1.0, _block(5, 10, 2, 0)), (1.0, _block(5, 10, 3, 1))]
    G1, G2 = _gram(10, 60, 3, slice(0, 5)), _gram(10, 60, 4, slice(5, 10))
    out = to_dense(regmean(parts, [InputGram.exact(G1), InputGram.exact(G2)], 0.9), torch.float64)
    g = torch.Generator().manual_seed(9)
    X1 = torch.randn(10, 20, generator=g, dtype=torch.float64)
    X1[5:] = 0.0  # block 1's inputs live in the first five coordinates only
    X2 = torch.randn(10, 20, generator=g, dtype=torch.float64)
    X2[:5] = 0.0
    # equal up to the relative ridge (1e-6 of the mean diagonal) that keeps M invertible
    assert torch.allclose(out @ X1, to_dense(parts[0][1], torch.float64) @ X1, atol=1e-4)
    assert torch.allclose(out @ X2, to_dense(parts[1][1], torch.float64) @ X2, atol=1e-4)
    naive = to_dense(parts[0][1], torch.float64) + to_dense(parts[1][1], torch.float64)
    assert not torch.allclose(naive @ X1, to_dense(parts[0][1], torch.float64) @ X1, atol=1e-3)


def test_sketch_woodbury_solve_equals_the_dense_solve_of_the_same_sketch():
    parts = [(1.0, _block(6, 40, 2, 0)), (1.5, _block(6, 40, 2, 1))]
    sk = [sketch(_gram(40, 100, 5 + i), 8) for i in range(2)]
    fast = regmean(parts, sk, 0.9)  # every Gram a sketch: Woodbury
    dense = [InputGram.exact(s.dense()) for s in sk]
    ref = to_dense(regmean(parts, dense, 0.9), torch.float64)
    assert torch.allclose(to_dense(fast, torch.float64), ref, atol=1e-6, rtol=1e-6)


def test_sketch_keeps_the_exact_diagonal_and_reconstructs_low_rank_grams():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 30, generator=g, dtype=torch.float64)
    G = X.T @ X / 50
    s = sketch(G, 4)
    assert torch.allclose(torch.diagonal(s.dense()), torch.diagonal(G))
    assert torch.allclose(s.dense(), G, atol=1e-8)
    assert torch.allclose(regularised(s, 0.5), 0.5 * G + 0.5 * torch.diag(torch.diagonal(G)), atol=1e-8)


@pytest.mark.parametrize("weights,alpha,text", [((1.0, -1.0), 0.9, "no negative weights"),
                                                 ((1.0, 1.0), 1.5, "alpha must be in [0, 1]"),
                                                 ((0.0, 0.0), 0.9, "at least one positive weight")])
def test_bad_inputs_are_one_line(weights, alpha, text):
    parts = [(weights[0], _block(4, 6, 2, 0)), (weights[1], _block(4, 6, 2, 1))]
    G = InputGram.exact(_gram(6, 20, 0))
    with pytest.raises(CompositionError) as info:
        regmean(parts, [G, G], alpha)
    assert text in str(info.value) and "\n" not in str(info.value)


def test_statistics_of_another_width_are_refused():
    parts = [(1.0, _block(4, 6, 2, 0)), (1.0, _block(4, 6, 2, 1))]
    with pytest.raises(CompositionError, match="width 5"):
        regmean(parts, [InputGram.exact(_gram(6, 20, 0)), InputGram.exact(_gram(5, 20, 0))], 0.9)


def test_float32_grams_factorised_in_float32_and_refined_match_float64():
    """Stored (float32) Grams take a float32 Cholesky refined in float64: the same result as float64 throughout."""
    parts = [(1.0, _block(10, 64, 4, 0)), (2.0, _block(10, 64, 4, 1)), (0.5, _block(10, 64, 4, 2))]
    grams = [_gram(64, 50 + 20 * i, 20 + i) * 10.0 ** i for i in range(3)]  # rank-deficient, scales 1 to 100
    out32 = regmean(parts, [InputGram.exact(G.float()) for G in grams], 0.9)
    ref = _dense_reference(parts, [G.float().double() for G in grams], 0.9)
    err = float((to_dense(out32, torch.float64) - ref).norm() / ref.norm())
    assert err < 1e-5, err
