"""Core-space bases, factored SVDs, polar factors and the dense re-factoring, against dense float64
references and algebraic identities on random non-zero factors."""

from __future__ import annotations

import math

import pytest
import torch

from lorablocks.core import algebra, sparsify
from lorablocks.core.algebra import LowRank, to_dense
from lorablocks.core.core_space import (core_space, factored_svd, from_core, polar_factor, refactor_dense,
                                        stacked_svd)

torch.set_num_threads(1)


def blocks(seed: int, shape=(12, 10), ranks=(3, 2, 4), dtype=torch.float64) -> list[LowRank]:
    g = torch.Generator().manual_seed(seed)
    o, i = shape
    return [LowRank(B=torch.randn(o, r, generator=g, dtype=dtype), A=torch.randn(r, i, generator=g, dtype=dtype))
            for r in ranks]


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


@pytest.mark.parametrize("shape", [(12, 10), (6, 10), (12, 5)], ids=["tall", "out<R", "in<R"])
def test_core_space_linear_rule_is_the_naive_sum_exactly(shape):
    xs = blocks(1, shape)
    w = [0.7, -1.3, 2.0]
    cs = core_space(xs)
    M = sparsify.merge(cs.cores, w, "linear")
    got = to_dense(from_core(cs, M), torch.float64)
    want = to_dense(algebra.add([{"m": x} for x in xs], w)["m"], torch.float64)
    assert rel(got, want) < 1e-12
    assert want.norm() > 1.0
    R = sum(x.rank for x in xs)
    assert cs.U_B.shape == (shape[0], min(shape[0], R)) and cs.V_A.shape == (shape[1], min(shape[1], R))
    assert all(M_i.shape == (cs.U_B.shape[1], cs.V_A.shape[1]) for M_i in cs.cores)


def test_core_space_bases_are_the_singular_vectors_of_the_stacks():
    xs = blocks(2)
    cs = core_space(xs)
    U = torch.linalg.svd(torch.cat([x.B for x in xs], dim=1), full_matrices=False)[0]
    V = torch.linalg.svd(torch.cat([x.A for x in xs], dim=0), full_matrices=False)[2].T
    # equal up to the sign of each singular vector
    assert torch.allclose((cs.U_B * U).sum(0).abs(), torch.ones(U.shape[1], dtype=torch.float64), atol=1e-10)
    assert torch.allclose((cs.V_A * V).sum(0).abs(), torch.ones(V.shape[1], dtype=torch.float64), atol=1e-10)
    for x, M in zip(xs, cs.cores):
        assert torch.allclose(M, cs.U_B.T @ to_dense(x, torch.float64) @ cs.V_A, atol=1e-10)


def test_factored_svd_matches_the_dense_svd():
    x = blocks(3, ranks=(4,))[0]
    U, S, Vh = factored_svd(x)
    dense = to_dense(x, torch.float64)
    assert torch.allclose(S, torch.linalg.svdvals(dense)[:4], atol=1e-10)
    assert torch.allclose(U @ torch.diag(S) @ Vh, dense, atol=1e-10)
    assert torch.allclose(U.T @ U, torch.eye(4, dtype=torch.float64), atol=1e-12)


def test_stacked_svd_reconstructs_every_block_and_drops_exact_rank_deficiency():
    xs = blocks(4)
    xs.append(LowRank(B=xs[0].B, A=2.0 * xs[0].A))  # in the span of block 0: no new direction
    U, S, Vhs = stacked_svd(xs)
    assert S.numel() == 9  # 3 + 2 + 4, not 12
    for x, Vh in zip(xs, Vhs):
        assert torch.allclose(U @ (S[:, None] * Vh), to_dense(x, torch.float64), atol=1e-10)
    dense = torch.cat([to_dense(x, torch.float64) for x in xs], dim=1)
    assert torch.allclose(S, torch.linalg.svdvals(dense)[:9], atol=1e-10)


@pytest.mark.parametrize("shape", [(20, 6), (4, 6)], ids=["tall", "wide"])
def test_polar_factor_is_the_nearest_orthogonal_matrix(shape):
    X = torch.randn(*shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    P = polar_factor(X)
    u, _, vh = torch.linalg.svd(X, full_matrices=False)
    assert torch.allclose(P, u @ vh, atol=1e-12)
    k = min(shape)
    gram = P.T @ P if shape[0] >= shape[1] else P @ P.T
    assert torch.allclose(gram, torch.eye(k, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)], ids=["tall", "wide"])
def test_refactor_dense_cap_reports_the_dropped_energy(shape):
    dense = torch.randn(*shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    S = torch.linalg.svdvals(dense)
    x, rep = refactor_dense("m", dense, rank=3)
    assert x.rank == 3 and rep.rank_in["m"] == 8 and rep.rank_out["m"] == 3
    want = math.sqrt(float(S[3:].pow(2).sum() / S.pow(2).sum()))
    assert rep.rel_error["m"] == pytest.approx(want, rel=1e-10)
    assert rel(to_dense(x, torch.float64), dense) == pytest.approx(want, rel=1e-8)
    assert rep.norm_sq["m"] == pytest.approx(float(dense.pow(2).sum()), rel=1e-12)


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)], ids=["tall", "wide"])
@pytest.mark.parametrize("rank", ["concat", "minimal", 8, 10_000])
def test_refactor_dense_lossless_modes_keep_the_module_whole(rank, shape):
    dense = torch.randn(*shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x, rep = refactor_dense("m", dense, rank=rank)
    assert x.rank == 8 and x.dtype == torch.float64
    assert rel(to_dense(x, torch.float64), dense) < 1e-13
    assert rep.rel_error["m"] == 0.0
    x32, _ = refactor_dense("m", dense.float(), rank=rank, dtype=torch.float32)
    assert x32.dtype == torch.float32 and rel(to_dense(x32, torch.float64), dense) < 1e-6


def test_refactor_dense_minimal_drops_below_rtol_and_zero_is_none():
    u = torch.linalg.qr(torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8)))[0]
    dense = u @ torch.diag(torch.tensor([1.0, 1e-3, 1e-9], dtype=torch.float64)) @ u.T
    x, rep = refactor_dense("m", dense, rank="minimal", rtol=1e-6)
    assert x.rank == 2 and rep.rel_error["m"] < 1e-7  # 1e-9 exactly; the Gram resolves S to ~1e-8 s_max
    assert rel(to_dense(x, torch.float64), dense) == pytest.approx(1e-9, rel=1e-3)
    none, rep0 = refactor_dense("z", torch.zeros(4, 3), rank="minimal")
    assert none is None and rep0.rank_out["z"] == 0 and rep0.rel_error["z"] == 0.0
    with pytest.raises(ValueError):
        refactor_dense("m", dense, rank="most")
