"""regmean end to end on a tiny Llama: stats -> combine --method regmean -> eval, and its refusals."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorablocks.cli import run_app
from lorablocks.compose.operations import open_blocks
from lorablocks.compose.recipe import compose
from lorablocks.files.adapters import load_adapter
from lorablocks.files.statistics import STATS_NAME, open_statistics
from lorablocks.core.algebra import to_dense
from tests.tiny_models import make_peft_adapter


@pytest.fixture(scope="module")
def blocks(tiny_model_dirs, domains, tmp_path_factory):
    """Two random adapters on the saved tiny Llama, each with statistics on its own domain."""
    root = tmp_path_factory.mktemp("regmean")
    llama = str(tiny_model_dirs["llama"])
    out = {}
    for i, d in enumerate(("math", "words")):
        a = make_peft_adapter("llama", root / d, seed=i, std=0.2, model=AutoModelForCausalLM.from_pretrained(llama))
        assert run_app(["stats", str(a), "--model", llama, "--data", str(domains[d]), "--limit", "16"]) == 0
        out[d] = a
    return out


def test_stats_file_shares_one_gram_per_input_site(blocks):
    stats = open_statistics(blocks["math"] / STATS_NAME)
    sites = {s: site.modules for s, site in stats.sites.items()}
    qkv = next(m for m in sites.values() if any(x.endswith("layers.0.self_attn.q_proj") for x in m))
    assert sorted(x.rsplit(".", 1)[1] for x in qkv) == ["k_proj", "q_proj", "v_proj"]  # one input, one Gram
    G = stats.gram(qkv[0]).dense()
    assert torch.allclose(G, G.T) and torch.linalg.eigvalsh(G).min() > -1e-6  # a Gram: symmetric, PSD
    assert stats.data["split"] == "train" and stats.data["tokens"] > 0 and stats.data["examples"] == 16


def test_combine_regmean_uses_stored_statistics_and_differs_from_sum_and_base(blocks, domains, tiny_model_dirs, tmp_path, capsys):
    a, b = str(blocks["math"]), str(blocks["words"])
    assert run_app(["combine", a, b, "--method", "regmean", "--alpha", "0.9", "--out", str(tmp_path / "rm")]) == 0
    assert run_app(["combine", a, b, "--out", str(tmp_path / "sum")]) == 0
    rm, sm = load_adapter(tmp_path / "rm"), load_adapter(tmp_path / "sum")
    record = json.loads((tmp_path / "rm" / "lorablocks.json").read_text())
    assert record["recipe"]["method"] == "regmean" and record["recipe"]["resolved_params"] == {"alpha": 0.9}
    assert [s["sha256"] for s in record["statistics"]] == [open_statistics(blocks[d] / STATS_NAME).sha256
                                                          for d in ("math", "words")]
    diffs = [float((to_dense(rm.delta[m]) - to_dense(sm.delta[m])).norm()) for m in rm.delta]
    assert min(diffs) > 1e-4 and all(float(to_dense(x).norm()) > 1e-3 for x in rm.delta.values())
    # eval with --method regmean composes the same way from the stored statistics
    llama = str(tiny_model_dirs["llama"])
    scores = {}
    for name, extra in (("base", []), ("sum", ["--adapter", a, "--adapter", b]),
                        ("regmean", ["--adapter", a, "--adapter", b, "--method", "regmean"]),
                        ("regmean-alpha", ["--adapter", a, "--adapter", b, "--method", "regmean", "--alpha", "0.2"])):
        out = tmp_path / f"{name}.json"
        assert run_app(["eval", "--model", llama, "--data", str(domains["math"]), "--limit", "4", "--json", str(out),
                        "--precision", "fp32", *extra]) == 0
        scores[name] = json.loads(out.read_text())["joint"]["perplexity"]
    assert len({round(v, 6) for v in scores.values()}) == 4, scores  # --alpha reaches eval's regmean
    # a parameter the method does not take: one line, exit 2
    assert run_app(["eval", "--model", llama, "--data", str(domains["math"]), "--limit", "4", "--adapter", a,
                    "--adapter", b, "--alpha", "0.5"]) == 2


def test_regmean_of_one_block_with_statistics_is_the_block(blocks):
    files = open_blocks([blocks["math"]])
    from lorablocks.compose.operations import blocks_of
    from lorablocks.compose.recipe import make_recipe

    out = compose(make_recipe(blocks_of(files), method="regmean", rank="concat"), files).delta
    ref = files[0].load().delta
    assert all(torch.allclose(to_dense(out[m]), to_dense(ref[m]), atol=1e-6) for m in ref)


def test_on_the_fly_statistics_with_data_match_the_stored_ones(blocks, domains, tiny_model_dirs, tmp_path):
    import shutil

    bare = [tmp_path / "m", tmp_path / "w"]
    for src, dst in zip((blocks["math"], blocks["words"]), bare):
        shutil.copytree(src, dst)
        (dst / STATS_NAME).unlink()
    args = ["combine", *map(str, bare), "--method", "regmean", "--model", str(tiny_model_dirs["llama"])]
    # the stored statistics used 16 train examples; on the fly uses the validation split: a different result
    assert run_app([*args, "--data", str(domains["math"]), "--data", str(domains["words"]), "--out", str(tmp_path / "fly")]) == 0
    fly = load_adapter(tmp_path / "fly").delta
    assert fly and all(float(to_dense(x).norm()) > 1e-3 for x in fly.values())
    rec = json.loads((tmp_path / "fly" / "lorablocks.json").read_text())
    assert [s["data"]["split"] for s in rec["statistics"]] == ["validation", "validation"]


def test_bad_inputs_get_one_line_and_exit_2(blocks, domains, tiny_model_dirs, tmp_path, capsys):
    import shutil

    a, b = str(blocks["math"]), str(blocks["words"])
    bare = tmp_path / "bare"
    shutil.copytree(blocks["words"], bare)
    (bare / STATS_NAME).unlink()
    cases = [
        (["combine", a, str(bare), "--method", "regmean", "--out", str(tmp_path / "o1")], "has no input statistics"),
        (["combine", a, b, "--method", "regmean", "--weights", "1,-1", "--out", str(tmp_path / "o2")], "no negative weights"),
        (["combine", a, b, "--method", "regmean", "--alpha", "1.5", "--out", str(tmp_path / "o3")], "alpha"),
        (["combine", a, b, "--method", "regmean", "--data", str(domains["math"]), "--out", str(tmp_path / "o4")],
         "one domain per adapter"),
        (["stats", a, "--model", str(tiny_model_dirs["llama"]), "--data", str(domains["math"])], "exists"),
    ]
    for argv, text in cases:
        capsys.readouterr()
        assert run_app(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert text in err and "\n" not in err and "Traceback" not in err, (argv, err)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_statistics_of_another_model_or_width_are_refused(blocks, tmp_path, capsys):
    import shutil

    from lorablocks.files.statistics import write_statistics

    bad = tmp_path / "bad"
    shutil.copytree(blocks["words"], bad)
    st = open_statistics(bad / STATS_NAME)
    grams = {s: st.gram(site.modules[0]) for s, site in st.sites.items()}
    write_statistics(bad / STATS_NAME, grams, {s: site.modules for s, site in st.sites.items()}, "someone/else-7b",
                     st.data, force=True)
    assert run_app(["combine", str(blocks["math"]), str(bad), "--method", "regmean", "--out", str(tmp_path / "o")]) == 2
    assert "were collected on someone/else-7b" in capsys.readouterr().err
    from lorablocks.core.regmean import InputGram

    narrow = {s: InputGram.exact(torch.eye(site.size - 1)) for s, site in st.sites.items()}
    write_statistics(bad / STATS_NAME, narrow, {s: site.modules for s, site in st.sites.items()}, st.base_model,
                     st.data, force=True)
    assert run_app(["combine", str(blocks["math"]), str(bad), "--method", "regmean", "--out", str(tmp_path / "o")]) == 2
    assert "input width" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_statistics_of_other_weights_are_refused(blocks, tmp_path, capsys):
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(blocks["words"], moved)
    shutil.copy(blocks["math"] / STATS_NAME, moved / STATS_NAME)  # another block's statistics
    assert run_app(["combine", str(blocks["math"]), str(moved), "--method", "regmean", "--out", str(tmp_path / "o")]) == 2
    assert "collected for other weights" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_generate_composes_regmean_from_the_blocks_stored_statistics(blocks, tiny_model_dirs):
    """What ``generate --method regmean`` runs on (serving's open_composed): the stored statistics travel
    with each block's file, so the merged weights are the regmean composition, not the sum."""
    from lorablocks.serving.blocks import open_composed

    llama, ads = str(tiny_model_dirs["llama"]), [blocks["math"], blocks["words"]]
    rm = open_composed(llama, ads, None, method="regmean")
    sm = open_composed(llama, ads, None, method="sum")
    base = open_composed(llama, [], None)
    name = "model.layers.1.mlp.down_proj.weight"
    w_rm, w_sm, w_0 = (dict(m.model.named_parameters())[name] for m in (rm, sm, base))
    assert not torch.allclose(w_rm, w_sm, atol=1e-5) and not torch.allclose(w_rm, w_0, atol=1e-5)
    assert rm.recipe.method == "regmean"


def test_regmean_fingerprint_covers_the_statistics_used(blocks, domains, tiny_model_dirs, tmp_path):
    """Same adapters, other statistics: other weights, so another fingerprint (the record names both)."""
    import shutil

    copies = {d: tmp_path / f"copy-{d}" for d in blocks}
    for d, src in blocks.items():
        shutil.copytree(src, copies[d])
    a, b = str(copies["math"]), str(copies["words"])
    assert run_app(["combine", a, b, "--method", "regmean", "--out", str(tmp_path / "one")]) == 0
    first = json.loads((tmp_path / "one" / "lorablocks.json").read_text())["recipe"]
    want = [open_statistics(copies[d] / STATS_NAME).sha256 for d in ("math", "words")]
    assert [blk["statistics_sha256"] for blk in first["blocks"]] == want
    # the math block's statistics from the other domain's examples
    assert run_app(["stats", a, "--model", str(tiny_model_dirs["llama"]), "--data", str(domains["words"]),
                    "--limit", "16", "--force"]) == 0
    assert run_app(["combine", a, b, "--method", "regmean", "--out", str(tmp_path / "two")]) == 0
    second = json.loads((tmp_path / "two" / "lorablocks.json").read_text())["recipe"]
    assert second["blocks"][0]["statistics_sha256"] != want[0] and second["blocks"][1]["statistics_sha256"] == want[1]
    assert second["fingerprint"] != first["fingerprint"]
    one, two = load_adapter(tmp_path / "one"), load_adapter(tmp_path / "two")
    assert max(float((to_dense(one.delta[m]) - to_dense(two.delta[m])).norm()) for m in one.delta) > 1e-6
