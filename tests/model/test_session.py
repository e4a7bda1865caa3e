"""ComposedModel: compositions applied, replaced and removed exactly, bit for bit."""

from __future__ import annotations

import pytest
import torch

from lorablocks.core.algebra import LowRank
from lorablocks.errors import NonFiniteError, ShapeMismatchError
from lorablocks.model.merge import apply_delta, target_weight
from lorablocks.model.session import ComposedModel
from tests.tiny_models import TINY


def _random_delta(model, names, seed, rank=2):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        w, transposed = target_weight(model, n)
        o, i = w.shape[::-1] if transposed else w.shape
        out[n] = LowRank(torch.randn(o, rank, generator=g) * 0.2, torch.randn(rank, i, generator=g) * 0.2)
    return out


def _targets(model, kind):
    wanted = TINY[kind][1]
    return [n for n, _ in model.named_modules() if n.split(".")[-1] in wanted]


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_any_sequence_of_changes_equals_a_fresh_merge(kind):
    build = TINY[kind][0]
    model = build()
    names = _targets(model, kind)
    d1, d2 = _random_delta(model, names[:3], 1), _random_delta(model, names[1:], 2)
    session = ComposedModel(model)
    for _ in range(4):  # repeated add/replace: no drift
        session.apply(d1)
        session.apply(d2)
    fresh = build()
    apply_delta(fresh, d2)
    assert _same(model, fresh)
    assert not _same(model, build())  # the composition changed the weights
    report = session.clear()
    assert report.modules_restored == len(d2)
    assert _same(model, build())


def test_composed_context_restores_the_previous_composition():
    model = TINY["llama"][0]()
    names = _targets(model, "llama")
    d1, d2 = _random_delta(model, names[:2], 1), _random_delta(model, names[2:4], 2)
    session = ComposedModel(model)
    session.apply(d1)
    with session.composed(d2):
        only_d2 = TINY["llama"][0]()
        apply_delta(only_d2, d2)
        assert _same(model, only_d2)
    with_d1 = TINY["llama"][0]()
    apply_delta(with_d1, d1)
    assert _same(model, with_d1)


def test_a_failing_composition_leaves_the_model_unchanged():
    model = TINY["llama"][0]()
    names = _targets(model, "llama")
    good = _random_delta(model, names[:2], 1)
    session = ComposedModel(model)
    session.apply(good)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = dict(_random_delta(model, names[2:4], 3))
    x = bad[names[3]]
    bad[names[3]] = LowRank(x.B, x.A * float("nan"))
    with pytest.raises(NonFiniteError):
        session.apply(bad)
    wrong = {names[0]: LowRank(torch.ones(5, 1), torch.ones(1, 7))}
    with pytest.raises(ShapeMismatchError):
        session.apply(wrong)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert session.recipe is None and session._delta.keys() == good.keys()
