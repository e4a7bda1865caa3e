"""``knots`` (KnOTS, arXiv 2410.19735; reference code ``gstoica27/KnOTS``), factored.

Per module: the joint SVD ``[dW_1 ... dW_n] = U diag(S) [V_1^T ... V_n^T]`` (from the stack of the ``B_i``
and the block diagonal of the ``A_i``, through thin QRs, never dense). Each block's aligned part is its
coordinates in the shared basis, ``C_i = diag(S) V_i^T = U^T dW_i`` (the reference's ``s_on_V``); they are
merged by ``merge``: ``linear``, ``sum_i w_i C_i`` (then ``U C = sum_i w_i dW_i`` exactly), or ``ties``
(PEFT's TIES on the ``C_i``: trim to ``density``, elect signs on the unweighted trimmed parts, disjoint
weighted mean). Result ``U C_merged`` (rank <= R), re-factored at the rank mode.

Defaults: ``merge=ties`` (KnOTS-TIES, the paper's main method) with ``density=1`` (no trimming: the
reference's Llama-3-8B configuration, ``topK: 100``). The reference applies TIES to all layers at once with
one global weight; here it is per module, with per-block weights applied in the disjoint merge as in PEFT.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from lorablocks.compose.methods import Method, MethodParams, ModuleContext, ModuleResult
from lorablocks.compose.methods.ties import MAJORITY, MajoritySign, compress_as
from lorablocks.core import sparsify
from lorablocks.core.algebra import LowRank
from lorablocks.core.core_space import stacked_svd


class KnotsParams(MethodParams):
    """KnOTS: how the aligned parts are merged."""

    merge: Literal["linear", "ties"] = Field("ties", description="Merge of the aligned parts: linear or ties.")
    density: float = Field(1.0, gt=0.0, le=1.0, description="ties: fraction of each aligned part kept, in (0, 1].")
    majority_sign: MajoritySign = MAJORITY

    @model_validator(mode="after")
    def _ties_only(self) -> "KnotsParams":
        """``density`` and ``majority_sign`` given with ``merge=linear`` would be silently ignored: refuse."""
        if self.merge == "linear" and self.model_fields_set & {"density", "majority_sign"}:
            raise PydanticCustomError("knots_merge", "density and majority_sign apply only to merge=ties")
        return self


def combine(parts: Sequence[tuple[float, LowRank]], params: KnotsParams, ctx: ModuleContext) -> ModuleResult:
    """``U f(C_1..C_n)`` with ``C_i = diag(S) V_i^T`` from the joint SVD of ``[dW_1 ... dW_n]``."""
    U, S, Vhs = stacked_svd([x for _, x in parts])
    if S.numel() == 0:
        return ctx.compress(None)
    coords = [S[:, None] * Vh for Vh in Vhs]
    rule = "linear" if params.merge == "linear" else "ties"
    C = sparsify.merge(coords, [w for w, _ in parts], rule, params.density, params.majority_sign)
    return compress_as(ctx, LowRank(B=U, A=C), parts[0][1].dtype)


METHOD = Method(name="knots", summary="KnOTS: joint SVD of the blocks, merge of the aligned parts (factored)",
                params=KnotsParams, combine=combine)
