"""Bases and decompositions for merging blocks beyond the sum, from factors only (pure functions).

Notation: block ``i`` of a module has ``dW_i = B_i A_i`` (scale folded into ``A_i``), ``B_i: (out, r_i)``,
``A_i: (r_i, in)``, ``R = sum r_i``. Everything here is computed in float64 from thin QRs of tall factors and
SVDs of small matrices; nothing forms an ``out x in`` matrix except :func:`refactor_dense`, which *takes*
one (the full-space merges form it on purpose).

* Core space (arXiv 2509.17786): ``[B_1 ... B_n] = U_B S_B V_B^T``, ``[A_1; ...; A_n] = U_A S_A V_A^T``;
  task ``i``'s core is ``M_i = U_B^T B_i A_i V_A``; a merged core ``M`` maps back to ``U_B M V_A^T``.
* :func:`factored_svd`: ``B A = U diag(S) V^T`` through ``B = Q_b R_b``, ``A^T = Q_a R_a`` and the SVD of
  ``R_b R_a^T``.
* :func:`stacked_svd` (KnOTS): ``[dW_1 ... dW_n] = U diag(S) [V_1^T ... V_n^T]`` from the stack of ``B_i``
  and the block-diagonal of the ``A_i``.
* :func:`polar_factor`: ``X = P Sigma Q^T -> P Q^T``, the nearest matrix with orthonormal columns (rows).
* :func:`refactor_dense`: truncated SVD of a dense merged delta at a rank mode (through the Gram matrix of
  its smaller side, float64), with the error report of :func:`lorablocks.core.algebra.compress`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorablocks.core.algebra import CANCEL_TOL, COMPUTE_DTYPE, CompressionReport, LowRank

__all__ = ["CoreSpace", "core_space", "from_core", "factored_svd", "stacked_svd", "polar_factor",
           "left_singular_vectors", "sign_convention", "refactor_dense"]


def sign_convention(U: torch.Tensor) -> torch.Tensor:
    """``+1`` / ``-1`` per column of ``U``: the sign of the column's entry of largest magnitude.

    Singular vectors are defined up to sign; ``U * sign_convention(U)`` makes that entry positive, so that
    a rule which is not sign-equivariant (the ``frequency`` election breaks a 0 count towards ``+``) does
    not depend on the SVD routine's choice.
    """
    idx = U.abs().argmax(dim=0, keepdim=True)
    signs = torch.gather(U, 0, idx).sign().squeeze(0)
    return torch.where(signs == 0, torch.ones_like(signs), signs)


def left_singular_vectors(X: torch.Tensor) -> torch.Tensor:
    """Thin ``U`` of ``X = U S V^T`` (``X`` tall, ``m x k``): ``X = Q R``, ``R = u s v^T``, ``U = Q u``,
    with :func:`sign_convention`'s signs."""
    Q, R = torch.linalg.qr(X, mode="reduced")
    U = Q @ torch.linalg.svd(R, full_matrices=False)[0]
    return U * sign_convention(U)


@dataclass(frozen=True)
class CoreSpace:
    """A module's core space: ``U_B (out, k_b)``, ``V_A (in, k_a)`` and the cores ``M_i (k_b, k_a)``."""

    U_B: torch.Tensor
    V_A: torch.Tensor
    cores: tuple[torch.Tensor, ...]


def core_space(factors: Sequence[LowRank]) -> CoreSpace:
    """``U_B`` = left singular vectors of ``[B_1 ... B_n]``, ``V_A`` = right singular vectors of
    ``[A_1; ...; A_n]`` (every one of the ``min(out, R)`` / ``min(in, R)``, as the reference code keeps them),
    and ``M_i = (U_B^T B_i)(A_i V_A)`` in float64.

    ``U_B U_B^T B_i = B_i`` and ``A_i V_A V_A^T = A_i``, so ``U_B (sum_i w_i M_i) V_A^T = sum_i w_i B_i A_i``.
    """
    Bs = [x.B.to(COMPUTE_DTYPE) for x in factors]
    As = [x.A.to(COMPUTE_DTYPE) for x in factors]
    U_B = left_singular_vectors(torch.cat(Bs, dim=1))
    V_A = left_singular_vectors(torch.cat(As, dim=0).T)
    cores = tuple((U_B.T @ B) @ (A @ V_A) for B, A in zip(Bs, As))
    return CoreSpace(U_B=U_B, V_A=V_A, cores=cores)


def from_core(space: CoreSpace, M: torch.Tensor) -> LowRank:
    """The delta ``U_B M V_A^T`` of a merged core, factored as ``B = U_B M``, ``A = V_A^T`` (float64)."""
    return LowRank(B=space.U_B @ M, A=space.V_A.T)


def factored_svd(x: LowRank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``B A = U diag(S) Vh`` in float64 without forming ``B A``: ``U (out, k)``, ``S (k,)``,
    ``Vh (k, in)``, ``k = min(r, out, in)``, singular values in descending order."""
    Qb, Rb = torch.linalg.qr(x.B.to(COMPUTE_DTYPE), mode="reduced")
    Qa, Ra = torch.linalg.qr(x.A.to(COMPUTE_DTYPE).T, mode="reduced")
    u, S, vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    return Qb @ u, S, vh @ Qa.T


def stacked_svd(factors: Sequence[LowRank]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """KnOTS' joint SVD ``[dW_1 ... dW_n] = U diag(S) [Vh_1 ... Vh_n]`` in float64, factored.

    With ``A_i^T = Q_i R_i``: ``[dW_1 ... dW_n] = [B_1 R_1^T ... B_n R_n^T] blockdiag(Q_i^T)``; the thin SVD
    of the ``out x R`` first factor ``= U diag(S) vh`` gives ``Vh_i = vh[:, block i] Q_i^T`` (``k x in``);
    signs by :func:`sign_convention` on ``U``.
    Directions with ``S`` below ``CANCEL_TOL |[B_i]|_F |[A_i]|_F`` (exact rank deficiency) are dropped.
    """
    Qs, cols = [], []
    for x in factors:
        Q, R = torch.linalg.qr(x.A.to(COMPUTE_DTYPE).T, mode="reduced")
        Qs.append(Q)
        cols.append(x.B.to(COMPUTE_DTYPE) @ R.T)
    C = torch.cat(cols, dim=1)
    Qc, Rc = torch.linalg.qr(C, mode="reduced")
    u, S, vh = torch.linalg.svd(Rc, full_matrices=False)
    b_norm = math.sqrt(sum(float(x.B.to(COMPUTE_DTYPE).pow(2).sum()) for x in factors))
    a_norm = math.sqrt(sum(float(x.A.to(COMPUTE_DTYPE).pow(2).sum()) for x in factors))
    keep = int((S > CANCEL_TOL * b_norm * a_norm).sum())
    U, S, vh = Qc @ u[:, :keep], S[:keep], vh[:keep]
    signs = sign_convention(U)
    U, vh = U * signs, vh * signs[:, None]
    Vhs, start = [], 0
    for Q in Qs:
        Vhs.append(vh[:, start:start + Q.shape[1]] @ Q.T)
        start += Q.shape[1]
    return U, S, Vhs


def polar_factor(X: torch.Tensor) -> torch.Tensor:
    """Orthogonal polar factor ``P Q^T`` of ``X = P Sigma Q^T`` (``m x k``), through ``X = Q_x R``,
    ``R = u sigma v^T``: ``P Q^T = Q_x u v^T``. Orthonormal columns when ``m >= k``, rows otherwise."""
    Qx, R = torch.linalg.qr(X.to(COMPUTE_DTYPE), mode="reduced")
    u, _, vh = torch.linalg.svd(R, full_matrices=False)
    return Qx @ (u @ vh)


def _keep_count(S: torch.Tensor, rank: str | int, rtol: float, floor: float) -> int:
    """How many singular values a rank mode keeps: above ``rtol * s_max`` (minimal), above the round-off
    ``floor`` (concat: exact), or the top ``N`` above it (a cap)."""
    if S.numel() == 0 or float(S[0]) <= floor:
        return 0
    if rank == "minimal":
        return int((S > max(rtol * float(S[0]), floor)).sum())
    above = int((S > floor).sum())
    return above if rank == "concat" else min(int(rank), above)


def _gram_svd(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Singular values (descending) and singular vectors of the smaller side of ``M`` from the eigenvectors
    of its Gram matrix: ``M^T M = V diag(S^2) V^T`` when ``in <= out`` (``right=True``), else ``M M^T``."""
    right = M.shape[1] <= M.shape[0]
    G = M.T @ M if right else M @ M.T
    e, V = torch.linalg.eigh(G)
    S = e.flip(0).clamp(min=0.0).sqrt()
    return S, V.flip(1), right


def refactor_dense(name: str, dense: torch.Tensor, rank: str | int = "minimal", rtol: float = 1e-6,
                   dtype: torch.dtype | None = None) -> tuple[LowRank | None, CompressionReport]:
    """Truncated SVD ``dW = U diag(S) V^T -> B = U_k sqrt(S_k)``, ``A = sqrt(S_k) V_k^T`` (in ``dtype``).

    Computed in float64 through the Gram matrix of the smaller side (``in <= out``: ``dW^T dW = V S^2 V^T``,
    ``B = dW V_k S_k^{-1/2}``, so ``B A = dW V_k V_k^T``, the best rank-``k`` approximation, and all of ``dW``
    to float64 round-off when nothing is dropped; faster than a float32 SVD and far more accurate).
    ``k`` by rank mode: ``minimal`` keeps ``S > rtol * s_max``; ``concat`` (exact) every singular value
    above the Gram's round-off ``sqrt(n * eps) * s_max``; a cap ``N`` the top ``N`` of those (a cap above the
    module's dimensions keeps it whole). The report is :func:`~lorablocks.core.algebra.compress`'s:
    ``rank_in = min(out, in)``, ``rel_error = sqrt(sum_{j>k} S_j^2 / |dW|_F^2)``. ``None`` when ``dW`` is 0.
    """
    if isinstance(rank, str) and rank not in ("concat", "minimal"):
        raise ValueError(f"rank must be 'concat', 'minimal' or a positive integer, got {rank!r}")
    if isinstance(rank, int) and rank < 1:
        raise ValueError(f"rank cap must be a positive integer, got {rank}")
    dtype = dtype or dense.dtype
    M = dense.to(COMPUTE_DTYPE)
    S, V, right = _gram_svd(M)
    n = min(M.shape)
    floor = math.sqrt(n * torch.finfo(COMPUTE_DTYPE).eps) * (float(S[0]) if n else 0.0)
    keep = _keep_count(S, rank, rtol, floor)
    total = float(M.pow(2).sum())
    dropped = min(float(S[keep:].pow(2).sum()), total)
    report = CompressionReport(mode=str(rank))
    report.rank_in[name], report.rank_out[name] = n, keep
    report.norm_sq[name], report.dropped_sq[name] = total, dropped
    report.rel_error[name] = math.sqrt(dropped / total) if total > 0 else 0.0
    if keep == 0:
        return None, report
    root, Vk = S[:keep].sqrt(), V[:, :keep]
    if right:  # B = dW V_k S^{-1/2}, A = S^{1/2} V_k^T
        B, A = (M @ Vk) / root, root[:, None] * Vk.T
    else:  # dW = U S V^T with U from dW dW^T: B = U_k S^{1/2}, A = S^{-1/2} U_k^T dW
        B, A = Vk * root, (Vk.T @ M) / root[:, None]
    return LowRank(B=B.to(dtype), A=A.to(dtype)), report
