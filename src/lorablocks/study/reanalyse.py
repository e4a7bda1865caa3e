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

from lorablocks.errors import ConfigError, DataError, OutputExistsError
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


def _newest(paths) -> dict:
    """``key -> (path, record)`` keeping the most recently written record of each key."""
    best: dict = {}
    for key, path, rec in paths:
        if key not in best or path.stat().st_mtime_ns > best[key][0].stat().st_mtime_ns:
            best[key] = (path, rec)
    return best


def _cached_json(folder: Path, pattern: str):
    for path in sorted(folder.glob(pattern)):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict):
            yield path, rec


def _from_cache(out: Path, cfg: StudyConfig, merged_sets) -> tuple[dict, list, dict]:
    """Without results.json (a study stopped before its report): the newest cached record of each evaluation,
    block and probe that the config names."""
    cache = out / "cache"
    doms = set(cfg.domains)
    evals = _newest(((rec.get("label"), rec.get("seed")), p, rec) for p, rec in _cached_json(cache / "evals", "*.json")
                    if "per_example" in rec and set(rec.get("domains", {})) <= doms
                    and (rec.get("seed") is None or rec.get("seed") in cfg.seeds))
    wanted = {(s, (d,)) for s in cfg.seeds for d in cfg.domains} | {(s, tuple(m)) for s in cfg.seeds for m in merged_sets}
    blocks = []
    for folder in sorted((cache / "adapters").glob("*-seed*")):
        tag, _, rest = folder.name.rpartition("-seed")
        seed = rest.split("-", 1)[0]
        key = (int(seed), tuple(tag.split("+"))) if seed.isdigit() else None
        if key in wanted and (folder / "adapter_model.safetensors").is_file():
            blocks.append((key, folder / "adapter_model.safetensors", folder))
    newest = _newest(blocks)
    missing = sorted(wanted - set(newest))
    if missing:
        raise DataError(f"the trained block {'+'.join(missing[0][1])} (seed {missing[0][0]}) is not in the cache; "
                        "run the study again")
    training = []
    for (seed, subset), (_, folder) in newest.items():
        rec = next((r for _, r in _cached_json(folder, "lorablocks_train.json")), {})
        training.append({"seed": seed, "subset": list(subset), "path": str(folder),
                         "loss_curve": rec.get("loss_curve", []), "validation": rec.get("validation", []),
                         "precision": rec.get("precision"),
                         "seconds": rec.get("train_seconds", 0.0) + rec.get("validation_seconds", 0.0)})
    probes = {s: _newest((s, p, rec) for p, rec in _cached_json(cache / "probes", f"seed{s}-*.json")).get(s)
              for s in cfg.seeds}
    probes = {s: v[1] for s, v in probes.items() if v is not None}
    return {k: rec for k, (_, rec) in evals.items()}, training, probes


def reanalyse(out: str | Path, config: StudyConfig | None = None) -> StudyResult:
    """The study in ``out`` analysed again from its cache (typed errors for anything missing); ``config``
    replaces the folder's ``config.yaml`` (needed for a study stopped before it wrote its report)."""
    out = Path(out)
    if not out.is_dir() or output_kind(out) != "study":
        raise OutputExistsError(f"{out} is not a lorablocks study folder (no lorablocks study marker)")
    if config is None and not (out / "config.yaml").is_file():
        raise ConfigError(f"{out} holds no config.yaml (the study stopped before its report): name the study's "
                          "config or preset")
    cfg = config or _config(out)
    sums, merged_sets = plan_subsets(cfg.domains, cfg.max_sum_size, cfg.merged_subsets)
    if (out / "results.json").is_file():
        results = _read(out / "results.json")
        training = results.get("training", [])
        records, probes = _records(out, results), _probes(out, cfg, results)
    else:
        results = {}
        records, training, probes = _from_cache(out, cfg, merged_sets)
    inputs = Inputs(records=records, deltas=_deltas(out, training), training=training,
                    probes=probes, fits=_fits(results, cfg), sums=sums, merged_sets=merged_sets)
    try:
        result = analyse_inputs(cfg, inputs)
    except KeyError as exc:
        raise DataError(f"the cache holds no record for {exc.args[0]!r} that this config needs; run the study "
                        "again to compute it") from None
    if not results:
        result.inference["inputs"] = "the newest cached record of each evaluation, block and probe (no results.json)"
    result.versions = results.get("versions", {})
    result.timings.update({k: v for k, v in results.get("timings", {}).items() if k not in result.timings})
    return result
