"""The study end to end on a tiny model and toy domains: every report section, resume after a kill gives the
same results, changing one setting redoes only what depends on it, config errors are reported at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lorablocks.cli import run_app
from lorablocks.errors import ConfigError
from lorablocks.study.report import REPORT_SECTIONS
from lorablocks.study.config import load_config, plan_subsets
from tests.conftest import save_tiny_model, write_domain

DOMAINS = ["math", "words", "code"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    model = save_tiny_model("llama", root / "model")
    for d in DOMAINS:
        write_domain(root / "data" / d, d, n_train=32, n_val=8, n_test=8)
    cfg = {
        "model": str(model),
        "domains": DOMAINS,
        "train": {"steps_per_domain": 2, "batch_size": 4, "max_length": 64, "val_limit": 4, "checkpoint_every": 1},
        "eval": {"limit": 6, "max_length": 64},
    }
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return root, path


def _run(argv) -> int:
    return run_app([str(a) for a in argv])


def _numbers(out: Path) -> dict:
    res = json.loads((out / "results.json").read_text())
    res.pop("timings")
    for t in res["training"]:  # wall-clock time and location are not results
        t.pop("path")
        t.pop("seconds")
    for e in res["evaluations"]:
        e.pop("seconds")
    res["evaluations"].sort(key=lambda e: (e["label"], str(e["seed"])))
    return res


@pytest.fixture(scope="module")
def full_run(setup):
    root, cfg = setup
    out = root / "out"
    assert _run(["study", cfg, "--data", root / "data", "--out", out, "--threads", "1"]) == 0
    return out


def test_report_has_every_section_and_files(full_run):
    out = full_run
    report = (out / "report.md").read_text()
    for section in REPORT_SECTIONS:
        assert section in report, section
    for name in ("cosine_heatmap.png", "change_vs_overlap.png", "degradation.png", "training_loss.png", "methods.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    res = json.loads((out / "results.json").read_text())
    # 3 pairs + the triple, each with its merged-data adapter (default: pairs and all)
    assert [tuple(s["domains"]) for s in res["subsets"]] == [
        ("math", "words"), ("math", "code"), ("words", "code"), ("math", "words", "code")]
    for s in res["subsets"]:
        assert s["ppl_merged"]["joint"] > 1 and s["ppl_sum"]["joint"] > 1
        assert 0 < s["predictors"]["weight_rms"] <= 1 and s["predictors"]["function_mean"] > 0
        assert s["predictors"]["foreign_energy"] > 0  # the probe stores the pair energies
        joint = s["vs_merged"]["joint"]
        assert joint["low"] <= joint["value"] <= joint["high"] and joint["low"] < joint["high"]
        assert joint["family"] and joint["p_adj"] >= joint["p"]  # Holm-adjusted within a named family
    # every change in the report carries its interval
    assert "% [" in report
    assert "on these trained blocks" in report  # one seed: the words say so
    # one point per subset (paper) and per sum and domain (fine), seeds pooled
    assert len(res["fit_points"]["paper"]["y"]) == 4 and len(res["fit_points"]["fine"]["y"]) == 2 * 3 + 3
    fits = {(f["level"], f["predictor"], f["scope"]): f for f in res["fits"]}
    ctrl = fits[("fine", "weight_rms", "all sizes, k controlled")]
    assert ctrl["k_controlled"] and "permutations of the 3 domain labels" in ctrl["p_method"]
    assert ctrl["p"] is not None and "cannot reach 0.05" in ctrl["note"]  # 3 domains: 6 permutations
    assert fits[("fine", "foreign_energy", "all sizes, k NOT controlled")]["k_controlled"] is False
    assert fits[("fine", "weight_rms", "k = 3")]["rho"] is None  # 3 points: no fit
    assert {(d["method"], d["blocks"]) for d in res["degradation"]} == {("sum", 2), ("sum", 3)}
    assert res["method_summary"][0]["method"] == "sum" and res["method_summary"][0]["subsets"] == 4
    for u in res["unlearning"]:
        # subtracting a block from the sum of all equals the sum without it, up to float error
        assert u["delta_rel_diff"] < 1e-6
        assert u["ppl"]["max_rel_diff_vs_sum_without"] < 1e-4
    base = next(e for e in res["evaluations"] if e["label"] == "base")
    single = next(e for e in res["evaluations"] if e["label"] == "single:math")
    assert single["domains"]["math"]["perplexity"] != base["domains"]["math"]["perplexity"]
    sums = [e for e in res["evaluations"] if e["kind"] == "sum"]
    assert all(set(e["domains"]) == set(e["subset"]) for e in sums)  # a sum is scored on its own domains
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("model,kind,seed,subset,domain,perplexity")
    assert any(",vs_merged," in line for line in csv_lines)
    assert yaml.safe_load((out / "config.yaml").read_text())["domains"] == DOMAINS
    assert "torch" in json.loads((out / "versions.json").read_text())
    # the trained blocks are exposed as ordinary adapters
    from lorablocks.files.adapters import load_adapter

    assert {p.name for p in (out / "adapters").iterdir()} >= {"math", "words", "code", "merged-math+words"}
    assert load_adapter(out / "adapters" / "math").delta


def test_rerun_uses_the_cache_and_changing_eval_redoes_only_evaluation(setup, full_run, tmp_path):
    root, cfg = setup
    out = tmp_path / "out"
    import shutil

    shutil.copytree(full_run, out)
    adapters_before = {p.name: p.stat().st_mtime_ns for p in (out / "cache" / "adapters").iterdir()}
    assert _run(["study", cfg, "--data", root / "data", "--out", out]) == 0
    assert _numbers(out) == _numbers(full_run)
    res = json.loads((out / "results.json").read_text())
    assert res["timings"]["training_s"] < 1.0  # nothing retrained

    changed = yaml.safe_load(cfg.read_text())
    changed["eval"]["limit"] = 5
    cfg2 = tmp_path / "changed.yaml"
    cfg2.write_text(yaml.safe_dump(changed))
    assert _run(["study", cfg2, "--data", root / "data", "--out", out]) == 0
    adapters_after = {p.name: p.stat().st_mtime_ns for p in (out / "cache" / "adapters").iterdir()}
    assert adapters_after == adapters_before  # training untouched
    res2 = json.loads((out / "results.json").read_text())
    assert all(d["examples"] == 5 for e in res2["evaluations"] for d in e["domains"].values())


def test_killed_study_resumes_to_identical_results(setup, full_run, tmp_path):
    root, cfg = setup
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorablocks", "study", str(cfg), "--data", str(root / "data"), "--out", str(out),
         "--threads", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    adapters = out / "cache" / "adapters"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once the second block is being trained
        done = list(adapters.glob("*/adapter_model.safetensors")) if adapters.exists() else []
        if len(done) >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "report.md").exists()
    assert _run(["study", cfg, "--data", root / "data", "--out", out, "--threads", "1"]) == 0
    assert _numbers(out) == _numbers(full_run)


def test_config_errors_are_reported_together(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"domains": ["math"], "train": {"steps_per_domain": 0, "batch_size": -1},
                                   "eval": {"split": "train"}, "typo": 1}))
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    msg = str(exc.value)
    for fragment in ("domains", "train.steps_per_domain", "train.batch_size", "eval.split", "typo"):
        assert fragment in msg, fragment
    assert msg.startswith("5 problem(s)")


def test_config_cli_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("domains: [math, math]\nmerged_subsets: [[math, nope]]\n")
    assert _run(["study", bad, "--out", tmp_path / "o"]) == 2
    err = capsys.readouterr().err
    assert "domains must be distinct" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "notyaml.yaml").write_text("a: [1, 2\n")
    assert _run(["study", tmp_path / "notyaml.yaml", "--out", tmp_path / "o"]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert _run(["study", "--preset", "huge", "--out", tmp_path / "o"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_non_study_output_folder_is_refused(setup, tmp_path, capsys):
    root, cfg = setup
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("precious")
    assert _run(["study", cfg, "--data", root / "data", "--out", tmp_path / "busy"]) == 2
    assert "not a lorablocks study folder" in capsys.readouterr().err
    assert (tmp_path / "busy" / "thesis.tex").read_text() == "precious"


def test_a_user_file_named_study_json_does_not_make_a_study_folder(setup, tmp_path, capsys):
    root, cfg = setup
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "study.json").write_text('{"my": "notes"}')
    (busy / "report.md").write_text("my report")
    assert _run(["study", cfg, "--data", root / "data", "--out", busy]) == 2
    assert "not a lorablocks study folder" in capsys.readouterr().err
    assert (busy / "report.md").read_text() == "my report" and not (busy / "cache").exists()


def test_corrupt_cache_entries_are_recomputed_and_named(setup, full_run, tmp_path, capsys):
    import shutil

    root, cfg = setup
    out = tmp_path / "out"
    shutil.copytree(full_run, out)
    evals = sorted((out / "cache" / "evals").glob("*.json"))
    evals[0].write_text("{not json")
    block = next(p for p in (out / "cache" / "adapters").iterdir() if p.name.startswith("math-seed"))
    (block / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    (block / "lorablocks_train.json").write_text("[broken")
    assert _run(["study", cfg, "--data", root / "data", "--out", out, "--threads", "1"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "is corrupt: recomputing it" in err and "unusable" in err and "training it again" in err
    assert _numbers(out) == _numbers(full_run)


def test_plan_subsets():
    sums, merged = plan_subsets(["a", "b", "c", "d"], None, "pairs_and_all")
    assert len(sums) == 6 + 4 + 1 and len(merged) == 6 + 1
    sums, merged = plan_subsets(["a", "b", "c"], 2, [["c", "a"]])
    assert sums == [("a", "b"), ("a", "c"), ("b", "c")] and merged == [("a", "c")]


def test_presets_validate_and_give_enough_fine_points():
    for preset in ("smoke", "quick", "standard", "paper"):
        load_config(preset=preset)
    assert load_config(preset="paper").seeds == [0, 1, 2]
    for preset, floor in (("quick", 20), ("standard", 75)):
        cfg = load_config(preset=preset)
        sums, _ = plan_subsets(cfg.domains, cfg.max_sum_size, cfg.merged_subsets)
        assert sum(len(s) for s in sums) >= floor, preset
    assert {"medicine", "biomed"} <= set(load_config(preset="standard").domains)
    assert load_config(preset="standard").eval.limit >= 50


def test_methods_are_evaluated_beside_the_sum(setup, tmp_path):
    root, _ = setup
    cfg = yaml.safe_load((root / "study.yaml").read_text())
    cfg["domains"] = ["math", "words"]
    cfg["methods"] = [{"name": "ties", "params": {"density": 0.5}}, {"name": "learned", "params": {"steps": 2, "limit": 4}}]
    path = tmp_path / "methods.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert _run(["study", path, "--data", root / "data", "--out", out, "--threads", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    methods = {m["method"]: m for m in res["methods"]}
    assert set(methods) == {"ties(density=0.5)", "learned(limit=4,steps=2)"}
    for m in methods.values():
        iv = m["vs_sum"]["joint"]
        assert iv["low"] <= iv["value"] <= iv["high"] and m["vs_merged"] is not None
    assert methods["ties(density=0.5)"]["vs_sum"]["joint"]["value"] != 0  # ties is not the sum
    fit = methods["learned(limit=4,steps=2)"]["fit"]
    assert fit["heldout_loss_best"] <= fit["heldout_loss_start"]
    report = (out / "report.md").read_text()
    assert "ties(density=0.5)" in report and (out / "methods.png").is_file()
    for m in methods.values():  # the gap closed and the singles' ceiling, from the joint perplexities
        g = m["gap"]
        assert g["ppl_method"] != g["ppl_sum"] and g["ppl_singles"] > 0
        gap = g["ppl_sum"] - g["ppl_merged"]
        if gap > 0:
            assert g["closed"] == pytest.approx((g["ppl_sum"] - g["ppl_method"]) / gap)
            assert g["ceiling"] == pytest.approx((g["ppl_sum"] - g["ppl_singles"]) / gap)
            assert f"{100 * g['closed']:.0f} % ({100 * g['ceiling']:.0f} %)" in report
        else:
            assert g["closed"] is None and "no gap (sum not worse)" in report


def test_analyse_rewrites_the_report_from_the_cache(full_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(full_run, out)
    before = _numbers(out)
    (out / "report.md").write_text("stale")
    (out / "results.json").write_text(json.dumps({**json.loads((out / "results.json").read_text()), "fits": []}))
    assert _run(["analyse", out]) == 0
    assert "from the cache" in " ".join(capsys.readouterr().err.split())
    assert _numbers(out) == before  # the same numbers as the study itself, without a model or data
    report = (out / "report.md").read_text()
    for section in REPORT_SECTIONS:
        assert section in report
    assert "lorablocks study" in report.split("## Reproduce")[1]


def test_analyse_refuses_a_folder_that_is_not_a_study(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "results.json").write_text("{}")
    assert _run(["analyse", tmp_path / "mine"]) == 2
    err = capsys.readouterr().err
    assert "not a lorablocks study folder" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "mine" / "results.json").read_text() == "{}"


def test_analyse_names_missing_per_example_scores(full_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(full_run, out)
    for p in (out / "cache" / "evals").glob("sum-math+words-*.json"):
        p.unlink()
    report = (out / "report.md").read_text()
    assert _run(["analyse", out]) == 2
    assert "no per-example scores for sum:math+words" in capsys.readouterr().err
    assert (out / "report.md").read_text() == report  # nothing half-written


def test_analyse_of_a_study_probed_before_pair_energies_says_what_is_missing(full_run, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(full_run, out)
    for p in (out / "cache" / "probes").glob("*.json"):
        rec = json.loads(p.read_text())
        rec.pop("energy"), rec.pop("tokens")
        p.write_text(json.dumps(rec))
    assert _run(["analyse", out]) == 0
    res = json.loads((out / "results.json").read_text())
    assert "foreign_energy" not in res["fit_points"]["fine"]["x"] and "function_mean" in res["fit_points"]["fine"]["x"]
    assert "pair energies" in res["inference"]["missing"]
    assert "Missing: foreign_energy" in (out / "report.md").read_text()


def test_analyse_of_a_study_stopped_before_its_report_reads_the_newest_cache(setup, full_run, tmp_path, capsys):
    import shutil

    root, cfg = setup
    out = tmp_path / "out"
    shutil.copytree(full_run, out)
    want = _numbers(out)
    for name in ("report.md", "results.json", "config.yaml"):
        (out / name).unlink()
    assert _run(["analyse", out]) == 2  # no config to read: say so
    assert "name the study's config or preset" in " ".join(capsys.readouterr().err.split())
    assert _run(["analyse", out, cfg]) == 0
    got = _numbers(out)
    for key in ("subsets", "fits", "fine", "degradation", "unlearning", "comparisons"):
        assert got[key] == want[key], key
    assert "no results.json" in got["inference"]["inputs"]
