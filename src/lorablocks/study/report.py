"""The study report: ``report.md``, PNG plots, ``results.json``, ``results.csv``, resolved config, versions.

Every change is shown with its 95 % interval, ``+4.3 % [+1.2, +7.5]``; a `*` and every "really" in the
summary are Holm-adjusted decisions within a named family (:mod:`lorablocks.study.analysis`). Each file is
written atomically; :func:`write_report` is what both ``lorablocks study`` and ``lorablocks analyse`` call.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path
from typing import Any

from lorablocks.files.outputs import atomic_file, write_json
from lorablocks.study import report_sections as sec
from lorablocks.study.report_summary import summary
from lorablocks.study.resample import Interval
from lorablocks.study.results import StudyResult

__all__ = ["write_report", "REPORT_SECTIONS"]

#: Headings every report has (the tests check them).
REPORT_SECTIONS = [
    "## Summary",
    "## Setup",
    "## Perplexity per domain",
    "## Naive sum vs merged-data training",
    "## Overlap",
    "## Change vs overlap",
    "## Near and far domains",
    "## Degradation vs number of blocks",
    "## Unlearning",
    "## Composition methods",
    "## Training",
    "## Statistical method",
    "## Reproduce",
]


def _jsonable(obj: Any) -> Any:
    """Dataclasses, intervals, tuples and numpy scalars as JSON; NaN/inf as null."""
    if isinstance(obj, Interval):
        return _jsonable(obj.to_dict())
    if dataclasses.is_dataclass(obj):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if hasattr(obj, "item") and not isinstance(obj, (list, tuple, dict)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _change_row(model: str, subset: str, domain: str, what: str, iv: Interval) -> dict:
    return {"model": model, "kind": "change", "seed": "", "subset": subset, "domain": domain, "perplexity": "", "nll": "",
            "tokens": "", "examples": "", "comparison": what, "change_pct": iv.value, "ci_low": iv.low, "ci_high": iv.high,
            "p": "" if iv.p is None else iv.p, "p_holm": "" if iv.p_adj is None else iv.p_adj, "family": iv.family or ""}


def _csv(r: StudyResult) -> str:
    blank = {"comparison": "", "change_pct": "", "ci_low": "", "ci_high": "", "p": "", "p_holm": "", "family": ""}
    rows = [{"model": e["label"], "kind": e["kind"], "seed": e["seed"], "subset": "+".join(e["subset"]), "domain": d,
             "perplexity": s["perplexity"], "nll": s["nll"], "tokens": s["tokens"], "examples": s["examples"], **blank}
            for e in r.evaluations for d, s in e["domains"].items()]
    for s in r.subsets:
        for what, ivs in (("vs_merged", s.vs_merged or {}), ("vs_single", s.vs_single)):
            rows += [_change_row(f"sum:{'+'.join(s.domains)}", "+".join(s.domains), d, what, iv) for d, iv in ivs.items()]
    for m in r.methods:
        for what, ivs in (("vs_sum", m.vs_sum), ("vs_merged", m.vs_merged or {})):
            rows += [_change_row(f"{m.method}:{'+'.join(m.domains)}", "+".join(m.domains), d, what, iv) for d, iv in ivs.items()]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["model"])
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_report(result: StudyResult, out: str | Path, command: str = "") -> Path:
    """Write every report file into ``out`` (each atomically; the cache stays)."""
    import yaml

    from lorablocks.study.plots import study_plots

    out = Path(out)
    files = study_plots(result, out)
    md = ["# Naive LoRA summation study", "",
          "Reproduces and extends the experiment of arXiv 2508.11985 (Cao, Truong, Lizarraga, 2025): one LoRA "
          "adapter per domain, their exact sum compared with a LoRA trained on the merged data, overlap as a "
          "predictor of interference, unlearning by subtraction, and composition methods beyond the sum.", "",
          *summary(result)]
    md += sec.setup(result) + sec.perplexities(result) + sec.vs_merged(result) + sec.overlap(result, files)
    md += sec.fits(result, files) + sec.pairs(result) + sec.degradation(result, files)
    md += sec.unlearning(result) + sec.methods(result, files) + sec.training(result, files) + sec.method_notes(result)
    md += ["## Reproduce", "", "```", command or "lorablocks study ...", "```", "",
           "`lorablocks analyse STUDY_DIR` recomputes every statistic of this report from the study's cache (seconds). "
           "The exact configuration is in `config.yaml`, library versions in `versions.json`, all numbers with their "
           "intervals in `results.json` and `results.csv`; trained adapters in `adapters/`.", "",
           "Versions: " + ", ".join(f"{k} {v}" for k, v in result.versions.items()), ""]
    with atomic_file(out / "report.md", force=True) as fh:
        fh.write("\n".join(md))
    write_json(out / "results.json", _jsonable(result), force=True)
    with atomic_file(out / "results.csv", force=True) as fh:
        fh.write(_csv(result))
    with atomic_file(out / "config.yaml", force=True) as fh:
        yaml.safe_dump(result.config, fh, sort_keys=False)
    write_json(out / "versions.json", result.versions, force=True)
    return out / "report.md"
