"""Exact LoRA delta algebra in factored form (pure functions, no files, no modules).

A LoRA adapter changes the weight of each target module ``m`` by ``dW_m = s_m * B_m @ A_m`` with
``A_m`` of shape ``(r, in)``, ``B_m`` of shape ``(out, r)`` and ``s_m = alpha / r`` (``alpha / sqrt(r)``
with rsLoRA). A :class:`LowRank` holds one such delta with the scale already folded into ``A``, in the
``(out, in)`` orientation of ``nn.Linear``; a :data:`Delta` maps module names to :class:`LowRank`.

* ``add`` is exact: ``sum_i w_i B_i A_i = [B_1 ... B_n] @ [w_1 A_1; ...; w_n A_n]`` (rank ``sum r_i``).
* ``compress`` finds the smallest exact rank (QR of both stacked factors, SVD of the small core) or
  truncates to a rank cap and reports the relative Frobenius error it made.
* Nothing here forms a dense ``out x in`` matrix except :func:`to_dense`, which exists for tests and for
  merging into base weights.

The A's and B's are never mixed separately (``(sum B_i)(sum A_i)`` keeps cross terms ``B_i A_j``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from lorablocks.errors import NonFiniteError, ShapeMismatchError

__all__ = [
    "LowRank",
    "Delta",
    "CompressionReport",
    "lora_scale",
    "from_peft_factors",
    "to_dense",
    "scale",
    "negate",
    "add",
    "subtract",
    "mean",
    "compress",
    "singular_values",
    "check_finite",
    "check_compatible",
    "shapes",
    "frobenius_norm",
]

#: Precision used inside QR/SVD. Results are cast back to the factors' dtype (float32 by default).
COMPUTE_DTYPE = torch.float64
#: Singular values below this fraction of |B|_F |A|_F are exact cancellation left-overs (float64 round-off).
CANCEL_TOL = 1e-10


@dataclass(frozen=True)
class LowRank:
    """One module's delta ``dW = B @ A`` (scale folded in), ``A: (r, in)``, ``B: (out, r)``."""

    B: torch.Tensor
    A: torch.Tensor

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ShapeMismatchError(
                f"factors do not chain: B {tuple(self.B.shape)} @ A {tuple(self.A.shape)}"
            )

    @property
    def rank(self) -> int:
        """Stored rank (number of columns of B); the true rank may be smaller."""
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape ``(out, in)`` of the dense delta."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype


#: A whole adapter's delta: module name -> factored delta of that module.
Delta = dict[str, LowRank]


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The LoRA scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA. The one place it is computed."""
    if r <= 0:
        raise ValueError(f"LoRA rank must be positive, got {r}")
    return float(alpha) / (math.sqrt(r) if use_rslora else r)


def from_peft_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, s: float, dtype=torch.float32) -> LowRank:
    """Fold a PEFT module's scale into its factors: ``lora_A (r, in)``, ``lora_B (out, r)``, scale ``s``."""
    A = lora_A.to(COMPUTE_DTYPE) * s
    return LowRank(B=lora_B.to(dtype), A=A.to(dtype))


def to_dense(x: LowRank, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense ``(out, in)`` delta. Only for tests and merging into base weights."""
    return x.B.to(dtype) @ x.A.to(dtype)


def shapes(delta: Mapping[str, LowRank]) -> dict[str, tuple[int, int]]:
    return {name: x.shape for name, x in delta.items()}


def check_finite(delta: Mapping[str, LowRank], label: str = "adapter") -> None:
    """Raise :class:`NonFiniteError` naming the first module whose factors hold NaN or inf."""
    for name, x in delta.items():
        for which, t in (("A", x.A), ("B", x.B)):
            if not torch.isfinite(t).all():
                raise NonFiniteError(f"{label}: module {name} has NaN or inf in its lora_{which} factor")


def check_compatible(
    deltas: Sequence[Mapping[str, LowRank | tuple[int, int]]], labels: Sequence[str] | None = None
) -> None:
    """Raise :class:`ShapeMismatchError` if a module appears with different ``(out, in)`` shapes.

    Each mapping gives, per module, a :class:`LowRank` or just its ``(out, in)`` shape.
    """
    labels = list(labels) if labels is not None else [f"adapter {i + 1}" for i in range(len(deltas))]
    seen: dict[str, tuple[tuple[int, int], str]] = {}
    for label, delta in zip(labels, deltas):
        for name, x in delta.items():
            shape = x.shape if isinstance(x, LowRank) else tuple(x)
            if name in seen and seen[name][0] != shape:
                shape0, label0 = seen[name]
                raise ShapeMismatchError(
                    f"module {name} is {shape0[0]}x{shape0[1]} in {label0} but {shape[0]}x{shape[1]} "
                    f"in {label}: the adapters were trained on different base models"
                )
            seen.setdefault(name, (shape, label))


def scale(delta: Mapping[str, LowRank], w: float) -> Delta:
    """``w * delta`` (the weight goes on A; B is shared, not copied)."""
    return {name: LowRank(B=x.B, A=x.A * w) for name, x in delta.items()}


def negate(delta: Mapping[str, LowRank]) -> Delta:
    """The additive inverse ``-delta``: applying it removes what ``delta`` added."""
    return scale(delta, -1.0)


def add(deltas: Sequence[Mapping[str, LowRank]], weights: Sequence[float] | None = None) -> Delta:
    """Exact weighted sum ``sum_i w_i delta_i`` by concatenating factors (rank ``sum r_i`` per module).

    Modules may differ between adapters: a module an adapter lacks contributes zero. Ranks may differ.
    """
    if weights is None:
        weights = [1.0] * len(deltas)
    if len(weights) != len(deltas):
        raise ValueError(f"{len(weights)} weights for {len(deltas)} adapters")
    check_compatible(deltas)
    names: list[str] = []
    for d in deltas:
        names.extend(n for n in d if n not in names)
    out: Delta = {}
    for name in names:
        parts = [(w, d[name]) for w, d in zip(weights, deltas) if name in d and w != 0.0]
        if not parts:
            continue
        dtype = torch.promote_types(parts[0][1].A.dtype, torch.float32)
        B = torch.cat([x.B.to(dtype) for _, x in parts], dim=1)
        A = torch.cat([x.A.to(dtype) * w for w, x in parts], dim=0)
        out[name] = LowRank(B=B, A=A)
    return out


def subtract(a: Mapping[str, LowRank], b: Mapping[str, LowRank]) -> Delta:
    """``a - b`` exactly (concatenated rank); follow with :func:`compress` to drop cancelled rank."""
    return add([a, b], [1.0, -1.0])


def mean(deltas: Sequence[Mapping[str, LowRank]]) -> Delta:
    """The average ``(1/n) sum_i delta_i``: a distinct operation from the sum, named as such."""
    n = len(deltas)
    return add(deltas, [1.0 / n] * n)


@dataclass
class CompressionReport:
    """What :func:`compress` did: rank before/after and relative Frobenius error, per module and overall."""

    mode: str
    rank_in: dict[str, int] = field(default_factory=dict)
    rank_out: dict[str, int] = field(default_factory=dict)
    rel_error: dict[str, float] = field(default_factory=dict)
    #: squared Frobenius norms of the uncompressed module deltas and of what was dropped
    norm_sq: dict[str, float] = field(default_factory=dict)
    dropped_sq: dict[str, float] = field(default_factory=dict)

    def update(self, other: "CompressionReport") -> None:
        """Take in the modules of another report (e.g. when compressing one module at a time)."""
        for key in ("rank_in", "rank_out", "rel_error", "norm_sq", "dropped_sq"):
            getattr(self, key).update(getattr(other, key))

    @property
    def overall_rel_error(self) -> float:
        """``sqrt(sum dropped^2 / sum |dW|^2)`` over all modules."""
        total = sum(self.norm_sq.values())
        return math.sqrt(sum(self.dropped_sq.values()) / total) if total > 0 else 0.0

    @property
    def max_rel_error(self) -> float:
        return max(self.rel_error.values(), default=0.0)

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "overall_rel_error": self.overall_rel_error,
            "max_module_rel_error": self.max_rel_error,
            "modules": {
                n: {"rank_in": self.rank_in[n], "rank_out": self.rank_out[n], "rel_error": self.rel_error[n]}
                for n in self.rank_in
            },
        }


def _core_svd(x: LowRank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``B @ A = Qb @ (U diag(S) Vh) @ Qa^T`` via two thin QRs and the SVD of the small ``Rb @ Ra^T``."""
    # the float64 copies are temporaries, freed as soon as each QR returns
    Qb, Rb = torch.linalg.qr(x.B.to(COMPUTE_DTYPE), mode="reduced")  # (out, k), (k, r)
    Qa, Ra = torch.linalg.qr(x.A.to(COMPUTE_DTYPE).T, mode="reduced")  # (in, k'), (k', r)
    core = Rb @ Ra.T  # (k, k')
    U, S, Vh = torch.linalg.svd(core, full_matrices=False)
    return Qb, U, S, Vh, Qa


def singular_values(x: LowRank) -> torch.Tensor:
    """Singular values of the dense delta, from factors only (float64)."""
    if x.rank == 0:
        return torch.zeros(0, dtype=COMPUTE_DTYPE)
    return _core_svd(x)[2]


def frobenius_norm(x: LowRank) -> float:
    """``|B A|_F`` from the small Gram matrices: ``sqrt(tr((B^T B)(A A^T)))``."""
    B = x.B.to(COMPUTE_DTYPE)
    A = x.A.to(COMPUTE_DTYPE)
    return math.sqrt(max(float(torch.sum((B.T @ B) * (A @ A.T))), 0.0))


def compress(
    delta: Mapping[str, LowRank],
    rank: str | int = "minimal",
    rtol: float = 1e-6,
) -> tuple[Delta, CompressionReport]:
    """Re-factor each module at a smaller rank.

    ``rank="concat"`` returns the factors unchanged (exact). ``rank="minimal"`` keeps the singular values
    above ``rtol * s_max`` (exact up to that tolerance; the error is reported); in every mode, singular
    values below ``CANCEL_TOL * |B|_F |A|_F`` are treated as exact cancellation and dropped. An integer ``N`` keeps the
    top ``N`` singular values: the relative Frobenius error is ``sqrt(sum_{k>N} s_k^2 / sum_k s_k^2)``.
    Modules whose delta is zero are dropped (they contribute nothing). The new factors split the singular
    values evenly: ``B = Qb U sqrt(S)``, ``A = sqrt(S) Vh Qa^T``.
    """
    if isinstance(rank, str) and rank not in ("concat", "minimal"):
        raise ValueError(f"rank must be 'concat', 'minimal' or a positive integer, got {rank!r}")
    if isinstance(rank, int) and rank < 1:
        raise ValueError(f"rank cap must be a positive integer, got {rank}")
    report = CompressionReport(mode=str(rank))
    out: Delta = {}
    for name, x in delta.items():
        report.rank_in[name] = x.rank
        if rank == "concat":
            out[name] = x
            nsq = frobenius_norm(x) ** 2
            report.rank_out[name], report.rel_error[name] = x.rank, 0.0
            report.norm_sq[name], report.dropped_sq[name] = nsq, 0.0
            continue
        Qb, U, S, Vh, Qa = _core_svd(x)
        smax = float(S[0]) if S.numel() else 0.0
        # |B|_F |A|_F bounds every singular value of the terms that went in; what is left below
        # CANCEL_TOL of it after cancellation (A + B - B) is float64 round-off, not signal.
        floor = CANCEL_TOL * float(x.B.to(COMPUTE_DTYPE).norm() * x.A.to(COMPUTE_DTYPE).norm())
        if smax <= floor:
            keep = 0
        elif rank == "minimal":
            keep = int((S > max(rtol * smax, floor)).sum())
        else:
            keep = min(int(rank), int((S > floor).sum()))
        s2 = S.pow(2)
        total, dropped = float(s2.sum()), float(s2[keep:].sum())
        report.rank_out[name] = keep
        report.norm_sq[name], report.dropped_sq[name] = total, dropped
        report.rel_error[name] = math.sqrt(dropped / total) if total > 0 else 0.0
        if keep == 0:
            continue
        root = S[:keep].sqrt()
        # scale the small factors before the tall products: one (out x keep) temporary, not two
        B = Qb @ (U[:, :keep] * root)
        del Qb
        A = (root[:, None] * Vh[:keep]) @ Qa.T
        del Qa
        out[name] = LowRank(B=B.to(x.dtype), A=A.to(x.dtype))
    return out, report
