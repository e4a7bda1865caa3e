"""Function overlap from factors and projected Grams equals the dense computation."""

from __future__ import annotations

import torch

from lorablocks.core.algebra import LowRank, to_dense
from lorablocks.core.function_overlap import function_overlap, stacked_A
from lorablocks.passes.activations import projected_grams
from lorablocks.model.merge import target_weight
from tests.tiny_models import TINY


def _delta(shapes, seed, rank=2):
    g = torch.Generator().manual_seed(seed)
    return {m: LowRank(torch.randn(o, rank, generator=g, dtype=torch.float64),
                       torch.randn(rank, i, generator=g, dtype=torch.float64)) for m, (o, i) in shapes.items()}


def test_matches_dense_on_random_inputs():
    shapes = {"a": (6, 5), "b": (4, 7)}
    deltas = [_delta(shapes, 1), _delta(shapes, 2, rank=3), _delta({"a": (6, 5)}, 3)]
    g = torch.Generator().manual_seed(9)
    X = [{m: torch.randn(i, 11, generator=g, dtype=torch.float64) for m, (o, i) in shapes.items()} for _ in deltas]
    grams = []
    for Xi in X:
        grams.append({m: stacked_A(deltas, m) @ Xi[m] @ (stacked_A(deltas, m) @ Xi[m]).T for m in shapes})
    fo = function_overlap(deltas, grams)
    for i in range(3):
        out = [{m: to_dense(d[m], torch.float64) @ X[i][m] for m in d} for d in deltas]
        energy = [sum(float((y * y).sum()) for y in o.values()) for o in out]
        for j in range(3):
            assert abs(fo.interference[j][i] - energy[j] / energy[i]) < 1e-9 * max(1.0, energy[j] / energy[i])
            inner = sum(float((out[i][m] * out[j][m]).sum()) for m in out[i] if m in out[j])
            want = inner / (energy[i] * energy[j]) ** 0.5
            assert abs(fo.cosine[i][j] - want) < 1e-9
        assert fo.interference[i][i] == 1.0
        # the energy of a sum of blocks, cross terms included, from the stored pair energies
        for S in ([0, 1], [0, 2], [1, 2], [0, 1, 2]):
            summed = sum(float((sum(out[j][m] for j in S if m in out[j]) ** 2).sum()) for m in shapes)
            got = sum(fo.energy[i][j][k] for j in S for k in S)
            assert abs(got - summed) < 1e-9 * summed
    assert 0 < fo.interference[1][0] and fo.interference[1][0] != 1.0


def test_projected_grams_from_hooks_match_the_module_inputs():
    model = TINY["llama"][0]()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    shapes = {}
    for n in names:
        w, t = target_weight(model, n)
        shapes[n] = tuple(w.shape[::-1]) if t else tuple(w.shape)
    deltas = [_delta(shapes, 1), _delta(shapes, 2)]
    ids = torch.randint(1, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding never counts
    seen = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: seen.__setitem__(n, args[0].detach().clone())) for n in names]
    model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    grams = projected_grams(model, [(ids, mask)], deltas)
    for n in names:
        x = seen[n].reshape(-1, seen[n].shape[-1])[mask.reshape(-1).bool()].double()
        p = x @ stacked_A(deltas, n).T
        assert torch.allclose(grams[n], p.T @ p, rtol=1e-6, atol=1e-8)
        assert grams[n].abs().max() > 0
    # a third mask names the counted positions (the probe counts those predicting answer tokens)
    counted = torch.zeros_like(mask, dtype=torch.bool)
    counted[0, 3:6] = True
    part = projected_grams(model, [(ids, mask, counted)], deltas)
    for n in names:
        x = seen[n].reshape(-1, seen[n].shape[-1])[counted.reshape(-1)].double()
        p = x @ stacked_A(deltas, n).T
        assert torch.allclose(part[n], p.T @ p, rtol=1e-6, atol=1e-8)
        assert not torch.allclose(part[n], grams[n])
