"""Re-analysis of a finished study from its folder alone: no model, no data, no recomputation.

What the analysis reads is all in the study folder: ``config.yaml`` (the resolved config), ``results.json``
(which records the last run used: every evaluation's label, seed, recipe fingerprint and scores, and every
trained block's cache folder) and the cache (``cache/evals/*.json`` with each example's NLL and token count,
``cache/adapters/*`` with the trained blocks, ``cache/probes/*.json`` with the function-overlap probes).
Each evaluation record of ``results.json`` is matched to the cached record with the same label, seed, recipe
and scores, so a cache holding records of other settings (a study run again with a changed setting) is no
problem. The folder must carry the lorablocks study marker.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lorablocks.errors import DataError, OutputExistsError
from lorablocks.files.outputs import output_kind
from lorablocks.study.analysis import StudyResult, analyse_inputs
from lorablocks.study.config import StudyConfig, plan_subsets
from lorablocks.study.results import Inputs

__all__ = ["reanalyse"]


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} cannot be read ({exc}); run the study again to rebuild it") from None


def _config(out: Path) -> StudyConfig:
    import yaml
    from pydantic import ValidationError

    try:
        raw = yaml.safe_load((out / "config.yaml").read_text())
        return StudyConfig.model_validate(raw)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise DataError(f"{out / 'config.yaml'} is not a study config ({str(exc).splitlines()[0]})") from None


def _records(out: Path, results: dict) -> dict:
    """The cached evaluation records the last run used, matched by label, seed, recipe and scores."""
    cached: dict = {}
    for path in sorted((out / "cache" / "evals").glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and "per_example" in rec:
            cached.setdefault((rec.get("label"), rec.get("seed"), rec.get("recipe")), []).append(rec)
    records = {}
    for e in results.get("evaluations", []):
        key = (e["label"], e["seed"], e.get("recipe"))
        match = [r for r in cached.get(key, []) if _same(r["domains"], e["domains"])]
        if not match:
            raise DataError(f"the cache holds no per-example scores for {e['label']} (seed {e['seed']}); "
                            "run the study again to recompute them")
        records[(e["label"], e["seed"])] = match[0]
    return records


def _same(a: Any, b: Any) -> bool:
    """Scores equal as JSON numbers (results.json writes NaN as null)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return b is None
    return a == b


def _deltas(out: Path, training: list[dict]) -> dict:
    from lorablocks.files.adapters import load_adapter

    deltas = {}
    for t in training:
        path = Path(t["path"])
        if not (path / "adapter_model.safetensors").is_file():  # the study folder was moved: look in its cache
            path = out / "cache" / "adapters" / path.name
        if not (path / "adapter_model.safetensors").is_file():
            raise DataError(f"the trained block {'+'.join(t['subset'])} (seed {t['seed']}) is not in the cache; "
                            "run the study again")
        deltas[(t["seed"], tuple(t["subset"]))] = load_adapter(path).delta
    return deltas


def _probes(out: Path, cfg: StudyConfig, results: dict) -> dict:
    """Per seed the probe record whose interference is the one the last run reported (the mean over seeds)."""
    want = results.get("overlap", {}).get("interference")
    if not want:
        return {}
    found: dict[int, list] = {}
    for s in cfg.seeds:
        for path in sorted((out / "cache" / "probes").glob(f"seed{s}-*.json")):
            try:
                found.setdefault(s, []).append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
    import itertools

    import numpy as np

    if any(s not in found for s in cfg.seeds):
        return {}
    for combo in itertools.product(*[found[s] for s in cfg.seeds]):
        mean = np.mean([np.asarray(c["interference"], dtype=float) for c in combo], axis=0)
        if np.allclose(mean, np.asarray(want, dtype=float), rtol=1e-9, atol=1e-12, equal_nan=True):
            return dict(zip(cfg.seeds, combo))
    return {}


def _fits(results: dict, cfg: StudyConfig) -> dict:
    return {(m["method"], tuple(m["domains"]), cfg.seeds[0]): m["fit"] for m in results.get("methods", []) if m.get("fit")}


def reanalyse(out: str | Path) -> StudyResult:
    """The study in ``out`` analysed again from its cache (typed errors for anything missing)."""
    out = Path(out)
    if not out.is_dir() or output_kind(out) != "study":
        raise OutputExistsError(f"{out} is not a lorablocks study folder (no lorablocks study marker)")
    if not (out / "results.json").is_file():
        raise DataError(f"{out} holds no results.json: the study did not finish; run it again to complete it")
    results = _read(out / "results.json")
    cfg = _config(out)
    sums, merged_sets = plan_subsets(cfg.domains, cfg.max_sum_size, cfg.merged_subsets)
    training = results.get("training", [])
    inputs = Inputs(records=_records(out, results), deltas=_deltas(out, training), training=training,
                    probes=_probes(out, cfg, results), fits=_fits(results, cfg), sums=sums, merged_sets=merged_sets)
    result = analyse_inputs(cfg, inputs)
    result.versions = results.get("versions", {})
    result.timings.update({k: v for k, v in results.get("timings", {}).items() if k not in result.timings})
    return result
