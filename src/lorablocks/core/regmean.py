"""RegMean (Jin et al., ICLR 2023, arXiv 2212.09849) on factored LoRA deltas: pure functions over tensors.

Per module, blocks ``i`` with deltas ``dW_i = B_i A_i`` (scale folded into ``A``), weights ``w_i >= 0`` and
Grams ``G_i`` of the module's inputs on block ``i``'s domain, RegMean solves

    dW* = argmin_dW sum_i w_i ||dW X_i - dW_i X_i||^2 = (sum_i w_i dW_i G_i') M^-1,   M = sum_i w_i G_i'

with the paper's regularisation ``G' = alpha G + (1 - alpha) diag(G)`` and a small ridge
``RIDGE * mean(diag M)`` on ``M``'s diagonal (for inputs no block ever saw). It stays factored and exact:

    B* = [B_1 .. B_n],   A* = [w_1 A_1 G_1' M^-1; ..; w_n A_n G_n' M^-1]     (rank <= sum r_i)

so only ``in x in`` matrices are formed (never ``out x in``), solved in float64 by Cholesky.

**Weights are relative.** Scaling every ``w_i`` by ``c > 0`` changes nothing; with equal Grams the result
is the weighted *mean* ``sum_i w_i dW_i / sum_i w_i`` (the paper's convention: RegMean generalises
averaging). With different Grams each block keeps acting as itself on the inputs only its domain has.
Negative weights are refused (``M`` could be indefinite): unlearning with RegMean is recomposing without
the block.

**Grams are means.** Each Gram is ``mean over tokens of x x^T`` (token-count normalised), so a block whose
statistics came from more tokens does not weigh more; ``w_i`` alone says how much each domain counts.

A Gram is held exactly (:attr:`InputGram.full`) or, for wide inputs, as a sketch: its top ``k`` eigenpairs
plus the exact diagonal, ``G ~ U diag(S) U^T + diag(resid)`` with ``resid = diag(G) - diag(U S U^T) >= 0``.
The regularised sketch stays low-rank + diagonal, so ``M^-1`` goes through the Woodbury identity with a
``K x K`` core (``K = sum k_i``) instead of an ``in x in`` factorisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorablocks.core.algebra import COMPUTE_DTYPE, LowRank
from lorablocks.errors import CompositionError

__all__ = ["InputGram", "Factored", "sketch", "regularised", "factor", "regmean", "DEFAULT_ALPHA", "RIDGE"]

#: the paper's off-diagonal scaling, measured here first
DEFAULT_ALPHA = 0.9
#: relative ridge on ``M``'s diagonal (times its mean diagonal): makes ``M`` invertible for dead inputs
RIDGE = 1e-6


@dataclass(frozen=True)
class InputGram:
    """The (token-mean) Gram ``E[x x^T]`` of one module's inputs: exact ``full``, or a sketch ``U, S`` plus
    the exact diagonal ``diag`` (always present)."""

    diag: torch.Tensor
    full: torch.Tensor | None = None
    U: torch.Tensor | None = None
    S: torch.Tensor | None = None
    tokens: int = 0

    def __post_init__(self) -> None:
        n = self.diag.shape[0]
        if self.full is None and (self.U is None or self.S is None):
            raise ValueError("an InputGram needs its full matrix or a sketch (U, S)")
        if self.full is not None and tuple(self.full.shape) != (n, n):
            raise ValueError(f"Gram is {tuple(self.full.shape)}, its diagonal {n}")
        if self.U is not None and (self.U.shape[0] != n or self.S is None or self.S.shape[0] != self.U.shape[1]):
            raise ValueError("sketch factors do not fit the diagonal")

    @property
    def size(self) -> int:
        """The module's input width ``in``."""
        return int(self.diag.shape[0])

    @property
    def is_sketch(self) -> bool:
        return self.full is None

    @classmethod
    def exact(cls, gram: torch.Tensor, tokens: int = 0) -> InputGram:
        return cls(diag=torch.diagonal(gram).clone(), full=gram, tokens=tokens)

    def dense(self) -> torch.Tensor:
        """The ``in x in`` matrix (float64): exact, or the sketch with its residual diagonal."""
        if self.full is not None:
            return self.full.to(COMPUTE_DTYPE)
        U, S = self.U.to(COMPUTE_DTYPE), self.S.to(COMPUTE_DTYPE)
        return (U * S) @ U.T + torch.diag(self._resid())

    def _resid(self) -> torch.Tensor:
        U, S = self.U.to(COMPUTE_DTYPE), self.S.to(COMPUTE_DTYPE)
        return (self.diag.to(COMPUTE_DTYPE) - (U * U) @ S).clamp_min(0.0)


def sketch(gram: torch.Tensor, k: int, tokens: int = 0) -> InputGram:
    """The top-``k`` eigenpairs of a symmetric PSD ``gram`` plus its exact diagonal."""
    g = gram.to(COMPUTE_DTYPE)
    vals, vecs = torch.linalg.eigh(g)
    k = min(k, g.shape[0])
    vals, vecs = vals[-k:].clamp_min(0.0), vecs[:, -k:]
    return InputGram(diag=torch.diagonal(g).to(gram.dtype).clone(), U=vecs.to(gram.dtype).contiguous(),
                     S=vals.to(gram.dtype), tokens=tokens)


def regularised(g: InputGram, alpha: float, dtype: torch.dtype = COMPUTE_DTYPE) -> torch.Tensor:
    """``alpha G + (1 - alpha) diag(G)`` as a new dense matrix (float64 unless ``dtype`` says otherwise)."""
    d = g.full.to(dtype, copy=True) if g.full is not None else g.dense().to(dtype)  # dense() is a new matrix
    diag = torch.diagonal(d).clone()
    d.mul_(alpha)
    torch.diagonal(d).add_(diag, alpha=1.0 - alpha)
    return d


def _check(parts: Sequence[tuple[float, LowRank]], grams: Sequence[InputGram], alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise CompositionError(f"regmean alpha must be in [0, 1], got {alpha}", setting="alpha")
    if len(grams) != len(parts):
        raise CompositionError(f"{len(parts)} blocks but {len(grams)} Grams", setting="statistics")
    for w, _ in parts:
        if w < 0:
            raise CompositionError(f"regmean takes no negative weights (got {w:g}): to unlearn a block, compose "
                                   "the others without it", setting="weights")
    for (_, x), g in zip(parts, grams):
        if g.size != x.shape[1]:
            raise CompositionError(f"statistics of width {g.size} for a module of input width {x.shape[1]}",
                                   setting="statistics")


@dataclass(frozen=True)
class Factored:
    """What RegMean needs of one input site's Grams under given weights and ``alpha``: each ``G_i'`` (dense)
    or its sketch, and ``M``'s factorisation. Computed once per site and reused by every module the site
    feeds (``q/k/v_proj`` share one)."""

    grams: tuple[InputGram, ...]
    weights: tuple[float, ...]
    alpha: float
    regs: tuple[torch.Tensor, ...] = ()  # dense path: G_i'
    L: torch.Tensor | None = None  # dense path: Cholesky factor of M (None: M kept for a general solve)
    M: torch.Tensor | None = None
    scale: torch.Tensor | None = None  # float32 path: L factors diag(s)^-1 M diag(s)^-1, M kept in float64
    D: torch.Tensor | None = None  # Woodbury path: M = D + U C U^T
    U: torch.Tensor | None = None
    core: torch.Tensor | None = None  # C^-1 + U^T D^-1 U

    def matches(self, grams: Sequence[InputGram], weights: Sequence[float], alpha: float) -> bool:
        """Whether this factorisation is of these very Gram objects, weights and alpha."""
        return (len(grams) == len(self.grams) and all(a is b for a, b in zip(grams, self.grams))
                and tuple(weights) == self.weights and alpha == self.alpha)

    def times_regularised(self, i: int, At: torch.Tensor) -> torch.Tensor:
        """``G_i' @ At`` (without forming ``G_i'`` for a sketch)."""
        if self.regs:
            return (self.regs[i] @ At.to(self.regs[i].dtype)).to(COMPUTE_DTYPE)
        g, a = self.grams[i], self.alpha
        if g.full is not None:  # float32 path: alpha G A^T + (1 - alpha) diag(G) A^T, G' never formed
            diag = torch.diagonal(g.full).to(COMPUTE_DTYPE)
            return (a * (g.full @ At.to(g.full.dtype))).to(COMPUTE_DTYPE) + (1.0 - a) * diag[:, None] * At
        U, S = g.U.to(COMPUTE_DTYPE), g.S.to(COMPUTE_DTYPE)
        diag = a * g._resid() + (1.0 - a) * g.diag.to(COMPUTE_DTYPE)
        return a * (U * S) @ (U.T @ At) + diag[:, None] * At

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """``M^-1 rhs`` (float64)."""
        if self.scale is not None:  # float32 Cholesky of the Jacobi-scaled M, one float64 refinement step
            s = self.scale
            X = torch.cholesky_solve((rhs / s[:, None]).float(), self.L).double() / s[:, None]
            res = rhs - self.M @ X
            return X + torch.cholesky_solve((res / s[:, None]).float(), self.L).double() / s[:, None]
        if self.L is not None:
            return torch.cholesky_solve(rhs, self.L)
        if self.M is not None:
            return torch.linalg.solve(self.M, rhs)
        Dinv_rhs = rhs / self.D[:, None]
        if self.U is None:
            return Dinv_rhs
        Dinv_U = self.U / self.D[:, None]
        return Dinv_rhs - Dinv_U @ torch.linalg.solve(self.core, self.U.T @ Dinv_rhs)


def _factor_float32(weights: Sequence[float], grams: Sequence[InputGram], alpha: float) -> Factored | None:
    """Grams stored in float32 (what statistics files hold): ``M`` is formed in float32 and scaled by its
    diagonal, ``S = D^-1/2 M D^-1/2``. With ``alpha < 1`` every ``G_i'`` dominates ``(1 - alpha) diag(G_i)``,
    so ``S >= (1 - alpha) I`` and ``cond(S) <= in / (1 - alpha)``: a float32 Cholesky of ``S`` plus one float64
    refinement step against ``M`` solves to float64 accuracy, in about half the time of a float64 Cholesky.
    None (use float64) for ``alpha = 1`` or a Cholesky that fails."""
    if alpha >= 1.0:
        return None
    # M = sum_i w_i (alpha G_i + (1 - alpha) diag(G_i)) without forming any G_i' (each would be an in x in copy)
    M = torch.zeros_like(grams[0].full)
    for w, g in zip(weights, grams):
        M.add_(g.full, alpha=w * alpha)
        torch.diagonal(M).add_(torch.diagonal(g.full), alpha=w * (1.0 - alpha))
    torch.diagonal(M).add_(RIDGE * float(torch.diagonal(M).mean().clamp_min(1e-30)))
    s = torch.diagonal(M).double().clamp_min(1e-300).sqrt()
    sf = s.float()
    S = M / sf[:, None]
    S /= sf[None, :]
    L, info = torch.linalg.cholesky_ex(S)
    if int(info) != 0:
        return None
    return Factored(tuple(grams), tuple(weights), alpha, L=L, M=M.double(), scale=s)


def _factor_dense(weights: Sequence[float], grams: Sequence[InputGram], alpha: float) -> Factored:
    if all(g.full is not None and g.full.dtype == torch.float32 for g in grams):
        fast = _factor_float32(weights, grams, alpha)
        if fast is not None:
            return fast
    regs = tuple(regularised(g, alpha) for g in grams)
    M = torch.zeros_like(regs[0])
    for w, r in zip(weights, regs):
        M.add_(r, alpha=w)
    torch.diagonal(M).add_(RIDGE * float(torch.diagonal(M).mean().clamp_min(1e-30)))
    L, info = torch.linalg.cholesky_ex(M)
    ok = int(info) == 0
    return Factored(tuple(grams), tuple(weights), alpha, regs=regs, L=L if ok else None, M=None if ok else M)


def _factor_woodbury(weights: Sequence[float], grams: Sequence[InputGram], alpha: float) -> Factored:
    """``M = D + U C U^T`` (every Gram a sketch): ``D`` diagonal, ``U = [U_i]``, ``C`` diagonal."""
    D = sum(w * (alpha * g._resid() + (1.0 - alpha) * g.diag.to(COMPUTE_DTYPE)) for w, g in zip(weights, grams))
    D = D + RIDGE * float((D + sum(w * alpha * (g.U.to(COMPUTE_DTYPE) ** 2 @ g.S.to(COMPUTE_DTYPE))
                                   for w, g in zip(weights, grams))).mean().clamp_min(1e-30))
    keep = [(w, g) for w, g in zip(weights, grams) if w > 0]
    U = torch.cat([g.U.to(COMPUTE_DTYPE) for _, g in keep], dim=1)
    C = torch.cat([w * alpha * g.S.to(COMPUTE_DTYPE) for w, g in keep])
    pos = C > 0
    U, C = U[:, pos], C[pos]
    base = Factored(tuple(grams), tuple(weights), alpha, D=D)
    if C.numel() == 0:
        return base
    core = torch.diag(1.0 / C) + U.T @ (U / D[:, None])
    return Factored(tuple(grams), tuple(weights), alpha, D=D, U=U, core=core)


def factor(weights: Sequence[float], grams: Sequence[InputGram], alpha: float) -> Factored:
    """Factorise ``M = sum_i w_i G_i'`` (+ ridge): Cholesky, or Woodbury when every Gram is a sketch."""
    weights = [float(w) for w in weights]
    if all(g.is_sketch for g in grams):
        return _factor_woodbury(weights, grams, alpha)
    return _factor_dense(weights, grams, alpha)


def regmean(parts: Sequence[tuple[float, LowRank]], grams: Sequence[InputGram], alpha: float = DEFAULT_ALPHA,
            factored: Factored | None = None) -> LowRank:
    """The RegMean delta of ``parts`` (``(w_i, dW_i)``) with their Grams, factored at rank ``sum r_i``
    (float64 factors; see the module docstring for the formula and the weight convention). ``factored``:
    a :func:`factor` of these Grams, weights and alpha to reuse (another module of the same input site)."""
    _check(parts, grams, alpha)
    if sum(w for w, _ in parts) <= 0:
        raise CompositionError("regmean needs at least one positive weight", setting="weights")
    if len(parts) == 1:  # dW_1 itself attains zero loss, whatever its Gram
        w, x = parts[0]
        return LowRank(B=x.B.to(COMPUTE_DTYPE), A=x.A.to(COMPUTE_DTYPE))
    weights = [float(w) for w, _ in parts]
    if factored is None or not factored.matches(grams, weights, alpha):
        factored = factor(weights, grams, alpha)
    rhs = torch.cat([w * factored.times_regularised(i, x.A.to(COMPUTE_DTYPE).T)
                     for i, (w, x) in enumerate(parts)], dim=1)  # (in, R): columns w_i G_i' A_i^T
    X = factored.solve(rhs)
    B = torch.cat([x.B.to(COMPUTE_DTYPE) for _, x in parts], dim=1)
    return LowRank(B=B, A=X.T.contiguous())
