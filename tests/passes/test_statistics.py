"""The shared hooked pass, collected Grams and the statistics file (lorablocks.passes / files.statistics)."""

from __future__ import annotations

import pytest
import torch

from lorablocks.core.regmean import InputGram, sketch
from lorablocks.errors import AdapterFormatError, OutputExistsError
from lorablocks.files.statistics import open_statistics, write_statistics
from lorablocks.passes.hooks import hooked_pass
from lorablocks.passes.statistics import budgeted, collect_grams
from lorablocks.training.data import TokenizedExample
from tests import conftest

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
           "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
           "model.layers.0.mlp.down_proj"]


def _examples(n: int = 5) -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(0)
    return [TokenizedExample(tuple(int(t) for t in torch.randint(1, 250, (5 + 3 * i,), generator=g)), 2) for i in range(n)]


def test_hooked_pass_finds_shared_inputs_and_masks_padding():
    model = conftest.tiny_llama(300)
    got = collect_grams(model, MODULES, _examples(), pad=0)
    sites = {s: sorted(m.rsplit(".", 1)[1] for m in ms) for s, ms in got.modules.items()}
    assert sorted(sites.values()) == [["down_proj"], ["gate_proj", "up_proj"], ["k_proj", "q_proj", "v_proj"], ["o_proj"]]
    assert got.tokens == sum(len(e) for e in _examples())  # every non-padding token, none of the padding
    # the q/k/v Gram equals the token mean of x x^T of q_proj's input, collected by hand one example at a time
    xs = []
    h = model.get_submodule(MODULES[0]).register_forward_pre_hook(lambda _m, args: xs.append(args[0][0]))
    with torch.no_grad():
        for e in _examples():
            model(input_ids=torch.tensor([e.input_ids]))
    h.remove()
    X = torch.cat(xs).double()
    site = next(s for s, ms in got.modules.items() if MODULES[0] in ms)
    assert torch.allclose(got.grams[site].dense(), X.T @ X / X.shape[0], atol=1e-5)


def test_hooked_pass_restores_training_mode_and_removes_hooks():
    model = conftest.tiny_llama(300).train()
    batches = [(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long))]
    seen = []
    hooked_pass(model, MODULES[:1], batches, lambda name, site, x: seen.append(x.shape))
    assert seen == [torch.Size([3, 32])] and model.training
    assert not model.get_submodule(MODULES[0])._forward_pre_hooks


def test_hooked_pass_runs_the_head_on_one_position_unless_it_is_hooked():
    """Nothing reads the logits (a 262k vocabulary made them 4 GB per batch), so the head sees one position;
    the hooked modules still see every one, and a hooked head sees them all too."""
    model = conftest.tiny_llama(300)
    batches = [(torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long))]
    head_rows, seen = [], []
    h = model.lm_head.register_forward_pre_hook(lambda _m, args: head_rows.append(args[0].shape[1]))
    hooked_pass(model, MODULES[:1], batches, lambda name, site, x: seen.append(x.shape[0]))
    assert seen == [4] and head_rows == [1]
    head_rows.clear(), seen.clear()
    hooked_pass(model, ["lm_head"], batches, lambda name, site, x: seen.append(x.shape[0]))
    h.remove()
    assert seen == [4] and head_rows == [4]


def test_budgeted_stops_at_the_token_budget_but_keeps_one():
    exs = _examples()
    assert budgeted(exs, 13) == exs[:2] and budgeted(exs, 1) == exs[:1]


def test_statistics_file_round_trips_exact_and_sketched_grams(tmp_path):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 12, generator=g)
    exact = InputGram.exact(X.T @ X / 40, 40)
    Y = torch.randn(60, 30, generator=g)
    sk = sketch(Y.T @ Y / 60, 5, 60)
    path = tmp_path / "s.safetensors"
    st = write_statistics(path, {"a": exact, "b": sk}, {"a": ["m1", "m2"], "b": ["m3"]}, "base/x", {"split": "train"})
    again = open_statistics(path)
    assert again.sha256 == st.sha256 and again.base_model == "base/x" and again.data == {"split": "train"}
    assert torch.equal(again.gram("m2").dense(), exact.dense()) and again.gram("m1").tokens == 40
    assert again.sites["b"].kind == "sketch" and torch.allclose(again.gram("m3").dense(), sk.dense())
    with pytest.raises(OutputExistsError):
        write_statistics(path, {"a": exact}, {"a": ["m1"]}, None, {})
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(other))
    before = other.read_bytes()
    with pytest.raises(AdapterFormatError, match="not a lorablocks statistics file"):
        open_statistics(other)
    with pytest.raises(OutputExistsError, match="never replaced"):  # --force never replaces what we did not write
        write_statistics(other, {"a": exact}, {"a": ["m1"]}, None, {}, force=True)
    assert other.read_bytes() == before


def _sym(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(3 * n, n, generator=torch.Generator().manual_seed(seed))
    g = x.T @ x / (3 * n)
    return (g + g.T) / 2  # exactly symmetric


def test_packed_triangle_round_trips_and_refuses_a_wrong_length():
    from lorablocks.files.statistics import pack_triu, unpack_triu

    for n in (1, 2, 7, 33):
        g = _sym(n, n)
        packed = pack_triu(g)
        assert packed.shape == (n * (n + 1) // 2,)
        assert torch.equal(unpack_triu(packed, n), g)
    assert torch.equal(pack_triu(torch.arange(9.0).view(3, 3)), torch.tensor([0.0, 1, 2, 4, 5, 8]))
    with pytest.raises(ValueError, match="packed triangle"):
        unpack_triu(torch.zeros(5), 3)


def test_statistics_files_hold_half_the_bytes_and_format_1_files_are_still_read(tmp_path):
    import json

    from safetensors.torch import save_file

    from lorablocks.files.statistics import READABLE

    g = _sym(64, 3)
    new = tmp_path / "new.safetensors"
    write_statistics(new, {"a": InputGram.exact(g, 9)}, {"a": ["m1"]}, "base/x", {})
    old = tmp_path / "old.safetensors"
    info = {"format": READABLE[0], "base_model": "base/x",
            "sites": {"a": {"modules": ["m1"], "size": 64, "tokens": 9, "kind": "full"}}, "data": {}}
    save_file({"a.gram": g.contiguous()}, str(old), metadata={"lorablocks": json.dumps(info)})
    assert new.stat().st_size < 0.55 * old.stat().st_size
    for path in (new, old):
        again = open_statistics(path)
        assert torch.equal(again.gram("m1").dense(), g.double()) and again.gram("m1").tokens == 9
    info["format"] = "lorablocks-stats/2"  # claims packed triangles but holds a whole Gram
    bad = tmp_path / "bad.safetensors"
    save_file({"a.gram": g.contiguous()}, str(bad), metadata={"lorablocks": json.dumps(info)})
    with pytest.raises(AdapterFormatError, match="a.triu"):
        open_statistics(bad)
