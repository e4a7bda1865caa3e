"""The methods beyond the sum: hand-computed rules, identities, dense reference implementations, PEFT's
``*_svd`` combinations on tiny GPT-2 and Llama models, DARE determinism, and bad parameters."""

from __future__ import annotations

import pytest
import torch

from lorablocks.compose import Block, compose, make_recipe
from lorablocks.core import algebra, sparsify
from lorablocks.core.algebra import LowRank
from lorablocks.core.core_space import sign_convention
from lorablocks.errors import CompositionError
from lorablocks.files.adapters import load_adapter
from tests.core.test_algebra import random_delta
from tests.tiny_models import TINY, make_peft_adapter

torch.set_num_threads(1)

ELEMENTWISE = ["ties", "dare_linear", "dare_ties", "magnitude_prune"]

# Three hand-made task tensors and weights; the expected results below are worked out by hand.
T1 = [[3.0, -1.0, 0.5], [2.0, -4.0, 1.0]]
T2 = [[-2.0, 2.0, 1.0], [1.0, -3.0, -0.5]]
T3 = [[1.0, -3.0, -2.0], [-5.0, 1.0, 0.2]]
W = [1.0, 0.5, 2.0]
# density 0.5 keeps int(0.5 * 6) = 3 entries of each:
#   T1' = [[3,0,0],[2,-4,0]]  T2' = [[-2,2,0],[0,-3,0]]  T3' = [[0,-3,-2],[-5,0,0]]
# total:     sums [[1,-1,-2],[-3,-7,0]] -> signs [[+,-,-],[-,-,+]]
#            -> [[1*3, 2*(-3), 2*(-2)], [2*(-5), (1*(-4) + 0.5*(-3)) / 2, 0]]
TIES_TOTAL = [[3.0, -6.0, -4.0], [-10.0, -2.75, 0.0]]
# frequency: sign counts [[0,0,-1],[0,-2,0]] -> signs [[+,+,-],[+,-,+]]
TIES_FREQUENCY = [[3.0, 1.0, -4.0], [2.0, -2.75, 0.0]]
# magnitude_prune: T1' + 0.5 T2' + 2 T3'
MAGNITUDE = [[2.0, -5.0, -4.0], [-8.0, -5.5, 0.0]]
# DARE with fixed masks and density 0.5 (kept entries doubled):
KEEP = [[[1, 0, 1], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]], [[0, 1, 1], [1, 0, 0]]]
#   D1 = [[6,0,1],[0,-8,2]]  D2 = [[-4,4,0],[0,0,-1]]  D3 = [[0,-6,-4],[-10,0,0]]
DARE_LINEAR = [[4.0, -10.0, -7.0], [-20.0, -8.0, 1.5]]  # D1 + 0.5 D2 + 2 D3
# dare_ties: sums [[2,-2,-3],[-10,-8,1]] -> signs [[+,-,-],[-,-,+]]
DARE_TIES = [[6.0, -12.0, -8.0], [-20.0, -8.0, 2.0]]


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def dense(delta, name) -> torch.Tensor:
    return algebra.to_dense(delta[name], torch.float64)


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


def blocks(weights) -> list[Block]:
    return [Block(name=f"b{i}", weight=w) for i, w in enumerate(weights)]


def run(method: str, deltas, weights, rank="concat", **params):
    return compose(make_recipe(blocks(weights), method=method, params=params, rank=rank), deltas)


# --------------------------------------------------------------------------------------------- hand-computed
@pytest.mark.parametrize("rule, sign, want", [
    ("ties", "total", TIES_TOTAL), ("ties", "frequency", TIES_FREQUENCY), ("magnitude_prune", "total", MAGNITUDE),
])
def test_rules_by_hand(rule, sign, want):
    got = sparsify.merge([t(T1), t(T2), t(T3)], W, rule, density=0.5, majority_sign=sign)
    assert torch.equal(got, t(want))


@pytest.mark.parametrize("rule, want", [("dare_linear", DARE_LINEAR), ("dare_ties", DARE_TIES)])
def test_dare_with_fixed_masks_by_hand(rule, want):
    masks = [torch.tensor(k, dtype=torch.bool) for k in KEEP]
    got = sparsify.merge([t(T1), t(T2), t(T3)], W, rule, density=0.5, keep_masks=masks)
    assert torch.equal(got, t(want))


def test_weights_enter_only_the_disjoint_merge():
    # PEFT elects the sign on unweighted tensors: a negative weight does not flip the election
    got = sparsify.merge([t([[1.0]]), t([[2.0]])], [1.0, -1.0], "ties", density=1.0)
    assert torch.equal(got, t([[-0.5]]))  # (1*1 + (-1)*2) / 2


@pytest.mark.parametrize("x", [[[1.0, 1.0, 1.0], [1.0, 2.0, -2.0]], [[0.5, -3.0, 2.0], [1.0, -0.25, 4.0]]],
                         ids=["tied", "distinct"])
def test_magnitude_mask_is_peft_s_choice_even_with_ties(x):
    from peft.utils.merge_utils import magnitude_based_pruning

    x = t(x)
    for density in (0.2, 0.5, 0.7):
        mask = sparsify.magnitude_mask(x, density)
        assert int(mask.sum()) == int(density * 6)
        assert torch.equal(x * mask, magnitude_based_pruning(x, density))
    assert int(sparsify.magnitude_mask(x, 0.1).sum()) == 0  # int(0.6) = 0, as PEFT


@pytest.mark.parametrize("space", ["full", "core"])
def test_hand_computed_ties_through_compose(space):
    # dW_i = I @ T_i: in full space the rule sees T_i itself; "concat" keeps every non-zero singular value.
    deltas = [{"m": LowRank(B=torch.eye(2, dtype=torch.float64), A=t(x))} for x in (T1, T2, T3)]
    out = run("ties", deltas, W, rank="minimal", density=0.5, space=space)
    if space == "full":
        assert rel(dense(out.delta, "m"), t(TIES_TOTAL)) < 1e-12
    else:  # the core rule sees the blocks in the bases of the stacks, not the entries of T_i
        assert out.delta["m"].rank <= 2 and rel(dense(out.delta, "m"), t(TIES_TOTAL)) > 1e-3


# --------------------------------------------------------------------------------------------- identities
@pytest.mark.parametrize("space", ["core", "full"])
@pytest.mark.parametrize("method", ["magnitude_prune", "dare_linear"])
def test_density_one_linear_rules_are_the_sum(method, space):
    ds = [random_delta(s, dtype=torch.float64) for s in (1, 2, 3)]
    w = [0.7, -1.3, 2.0]
    out = run(method, ds, w, density=1.0, space=space)
    want = run("sum", ds, w)
    for m in want.delta:
        assert rel(dense(out.delta, m), dense(want.delta, m)) < 1e-10


@pytest.mark.parametrize("method, params", [("ties", {"density": 1.0}), ("ties", {"space": "full", "density": 1.0}),
                                            ("dare_ties", {"density": 1.0}), ("magnitude_prune", {"density": 1.0}),
                                            ("tsv", {}), ("knots", {}), ("knots", {"merge": "linear"})])
def test_one_block_returns_that_block(method, params):
    d = random_delta(4, dtype=torch.float64)
    out = run(method, [d], [-1.5], **params)
    for m in d:
        want = -1.5 * dense(d, m)
        assert rel(dense(out.delta, m), want) < 1e-10 and want.abs().max() > 0.1


def test_core_space_result_has_rank_at_most_the_sum_of_ranks():
    ds = [random_delta(s, rank=r, shapes={"w": (40, 30)}) for s, r in ((1, 3), (2, 4), (3, 2))]
    for method in ELEMENTWISE:
        out = run(method, ds, [1.0, 0.5, 1.0], rank="minimal", density=0.3)
        assert 0 < out.delta["w"].rank <= 9 and out.delta["w"].dtype == torch.float32
        assert out.report.rank_out["w"] == out.delta["w"].rank


def test_core_space_ties_equals_a_dense_reference_implementation():
    """The core-space reference (``U_B^T B_i A_i V_A`` from dense SVDs) with PEFT's own ``ties``."""
    from peft.utils.merge_utils import ties

    ds = [random_delta(s, rank=r, shapes={"w": (14, 11)}, dtype=torch.float64) for s, r in ((5, 3), (6, 2), (7, 4))]
    w = [1.0, -0.6, 1.3]
    B = torch.cat([d["w"].B for d in ds], dim=1)
    A = torch.cat([d["w"].A for d in ds], dim=0)
    U_B = torch.linalg.svd(B, full_matrices=False)[0]
    U_B = U_B * sign_convention(U_B)
    Vh_A = torch.linalg.svd(A, full_matrices=False)[2]
    Vh_A = Vh_A * sign_convention(Vh_A.T)[:, None]
    for sign in ("total", "frequency"):
        cores = [U_B.T @ dense(d, "w") @ Vh_A.T for d in ds]
        want = U_B @ ties(cores, torch.tensor(w, dtype=torch.float64), 0.4, sign) @ Vh_A
        got = run("ties", ds, w, density=0.4, majority_sign=sign)
        assert rel(dense(got.delta, "w"), want) < 1e-10


def test_full_space_cap_is_reported_like_compress():
    ds = [random_delta(s, shapes={"w": (12, 10)}, dtype=torch.float64) for s in (1, 2)]
    out = run("ties", ds, [1.0, 1.0], rank=2, space="full", density=0.5)
    whole = run("ties", ds, [1.0, 1.0], rank=10_000, space="full", density=0.5)
    S = torch.linalg.svdvals(dense(whole.delta, "w"))
    want = float((S[2:].pow(2).sum() / S.pow(2).sum()).sqrt())
    assert out.report.rank_in["w"] == 10 and out.report.rank_out["w"] == 2
    assert out.report.rel_error["w"] == pytest.approx(want, rel=1e-8)
    assert whole.report.rank_out["w"] == 10 and whole.report.rel_error["w"] == 0.0
    assert out.report.to_dict()["modules"]["w"]["rel_error"] == out.report.rel_error["w"]


# --------------------------------------------------------------------------------------------- tsv, knots
def orthogonal_blocks(shape=(12, 10), ranks=(2, 3, 1)) -> list[dict[str, LowRank]]:
    g = torch.Generator().manual_seed(9)
    Qo = torch.linalg.qr(torch.randn(shape[0], sum(ranks), generator=g, dtype=torch.float64))[0]
    Qi = torch.linalg.qr(torch.randn(shape[1], sum(ranks), generator=g, dtype=torch.float64))[0]
    out, start = [], 0
    for r in ranks:
        core = torch.randn(r, r, generator=g, dtype=torch.float64)
        out.append({"w": LowRank(B=Qo[:, start:start + r] @ core, A=Qi[:, start:start + r].T)})
        start += r
    return out


def test_tsv_on_orthogonal_blocks_keeping_every_triplet_is_the_sum():
    ds = orthogonal_blocks()
    w = [0.8, -1.1, 2.0]
    out = run("tsv", ds, w, fraction=1.0)
    want = sum(wi * dense(d, "w") for wi, d in zip(w, ds))
    assert rel(dense(out.delta, "w"), want) < 1e-10


def test_tsv_equals_a_dense_reference_implementation():
    """The reference's TSV-Merge on dense deltas (SVD per block, top k, concat, polar factors by SVD)."""
    ds = [random_delta(s, rank=3, shapes={"w": (16, 12)}, dtype=torch.float64) for s in (1, 2, 3)]
    w = [1.0, 0.5, -0.8]
    k = int(0.125 * 12)  # fraction 1/8 of min(out, in): 1 triplet each
    us, ss, vs = [], [], []
    for wi, d in zip(w, ds):
        u, s, vh = torch.linalg.svd(wi * dense(d, "w"), full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k])
    uu, _, uvh = torch.linalg.svd(torch.cat(us, dim=1), full_matrices=False)
    vu, _, vvh = torch.linalg.svd(torch.cat(vs, dim=0), full_matrices=False)
    want = uu @ uvh @ torch.diag(torch.cat(ss)) @ vu @ vvh
    got = run("tsv", ds, w, fraction=0.125)
    assert got.delta["w"].rank == 3 and rel(dense(got.delta, "w"), want) < 1e-10


def test_knots_linear_is_the_weighted_sum():
    ds = [random_delta(s, dtype=torch.float64) for s in (1, 2, 3)]
    w = [0.7, -1.3, 2.0]
    out = run("knots", ds, w, merge="linear")
    for m in ds[0]:
        want = sum(wi * dense(d, m) for wi, d in zip(w, ds))
        assert rel(dense(out.delta, m), want) < 1e-10


@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_knots_ties_equals_a_dense_reference_implementation(sign):
    """KnOTS on dense deltas: SVD of ``[dW_1 ... dW_n]``, PEFT's ``ties`` on ``diag(S) V_i^T``, ``U @ merged``."""
    from peft.utils.merge_utils import ties

    ds = [random_delta(s, rank=3, shapes={"w": (15, 9)}, dtype=torch.float64) for s in (1, 2, 3)]
    w = [1.0, 0.5, -0.8]
    U, S, Vh = torch.linalg.svd(torch.cat([dense(d, "w") for d in ds], dim=1), full_matrices=False)
    signs = sign_convention(U[:, :9])
    U, S, Vh = U[:, :9] * signs, S[:9], Vh[:9] * signs[:, None]
    coords = [S[:, None] * Vh[:, 9 * i: 9 * (i + 1)] for i in range(3)]
    want = U @ ties(coords, torch.tensor(w, dtype=torch.float64), 0.3, sign)
    got = run("knots", ds, w, density=0.3, majority_sign=sign)
    assert rel(dense(got.delta, "w"), want) < 1e-10


# --------------------------------------------------------------------------------------------- PEFT *_svd
def peft_svd_combination(kind: str, paths, weights, combination_type: str, density: float,
                         sign: str = "total") -> dict[str, torch.Tensor]:
    """PEFT's ``add_weighted_adapter(combination_type=..._svd)`` at a rank above every module's dimensions;
    the new adapter's delta per module, in the ``(out, in)`` orientation."""
    from peft import PeftModel

    build, _ = TINY[kind]
    pm = PeftModel.from_pretrained(build(), str(paths[0]), adapter_name="a0")
    for i, p in enumerate(paths[1:], start=1):
        pm.load_adapter(str(p), adapter_name=f"a{i}")
    pm.add_weighted_adapter([f"a{i}" for i in range(len(paths))], weights, adapter_name="merged",
                            combination_type=combination_type, svd_rank=256, density=density,
                            majority_sign_method=sign, svd_full_matrices=False)
    out = {}
    for name, module in pm.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and "merged" in getattr(module, "lora_A", {}):
            dw = module.get_delta_weight("merged").detach().double()
            out[name] = dw.T if kind == "gpt2" else dw
    return out


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("method, sign", [("ties", "total"), ("ties", "frequency"), ("magnitude_prune", None)])
def test_full_space_equals_peft_svd_combinations(tmp_path, kind, method, sign):
    paths = [make_peft_adapter(kind, tmp_path / f"a{i}", seed=10 + i, r=4, alpha=8.0) for i in range(3)]
    w = [1.0, 0.7, -0.5]
    params = {"density": 0.3, "space": "full"} | ({"majority_sign": sign} if sign else {})
    ours = run(method, [load_adapter(p).delta for p in paths], w, rank=10_000, **params)
    theirs = peft_svd_combination(kind, paths, w, f"{method}_svd", 0.3, sign or "total")
    assert set(theirs) == set(ours.delta)
    for name, want in theirs.items():
        assert rel(dense(ours.delta, name), want) < 1e-4, name
        assert want.abs().max() > 1e-3
    assert max(ours.report.rel_error.values()) < 1e-6


# --------------------------------------------------------------------------------------------- DARE seeds
@pytest.mark.parametrize("space", ["core", "full"])
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_same_seed_same_bytes_in_any_module_order(method, space):
    ds = [random_delta(s) for s in (1, 2, 3)]
    w = [1.0, 0.5, -0.7]
    a = run(method, ds, w, rank="minimal", density=0.4, space=space, seed=7)
    b = run(method, ds, w, rank="minimal", density=0.4, space=space, seed=7)
    reversed_ds = [dict(reversed(list(d.items()))) for d in ds]
    c = run(method, reversed_ds, w, rank="minimal", density=0.4, space=space, seed=7)
    other = run(method, ds, w, rank="minimal", density=0.4, space=space, seed=8)
    for m in ds[0]:
        for x in (b, c):
            assert torch.equal(a.delta[m].B, x.delta[m].B) and torch.equal(a.delta[m].A, x.delta[m].A)
        assert not torch.equal(dense(a.delta, m), dense(other.delta, m))


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("method, params, words", [
    ("ties", {"density": 0.0}, "density"),
    ("ties", {"density": 1.5}, "density"),
    ("dare_linear", {"density": -0.2}, "density"),
    ("magnitude_prune", {"density": float("nan")}, "density"),
    ("ties", {"space": "diagonal"}, "space"),
    ("ties", {"majority_sign": "mean"}, "majority_sign"),
    ("ties", {"seed": 3}, "takes no parameter seed"),
    ("dare_linear", {"majority_sign": "total"}, "takes no parameter majority_sign"),
    ("magnitude_prune", {"majority_sign": "total"}, "takes no parameter majority_sign"),
    ("sum", {"space": "full"}, "takes no parameter space"),
    ("tsv", {"density": 0.5}, "takes no parameter density"),
    ("tsv", {"fraction": 0.0}, "fraction"),
    ("knots", {"merge": "linear", "density": 0.5}, "merge=ties"),
    ("knots", {"merge": "mean"}, "merge"),
])
def test_bad_parameters_are_one_line_composition_errors(method, params, words):
    with pytest.raises(CompositionError, match=words) as info:
        make_recipe(blocks([1.0, 1.0]), method=method, params=params)
    assert "\n" not in str(info.value)


def test_every_new_method_is_registered_with_its_parameters():
    from lorablocks.compose.methods import get_method

    for name in [*ELEMENTWISE, "tsv", "knots"]:
        method = get_method(name)
        assert method.name == name and not method.linear
    assert set(get_method("dare_ties").params.model_fields) == {"density", "space", "majority_sign", "seed"}
