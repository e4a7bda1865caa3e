"""The ``study`` verb: the paper's experiment end to end, into a report."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lorablocks.cli.app import app, console


@app.command("study")
def study_cmd(
    config: Annotated[Optional[Path], typer.Argument(help="Study config (YAML); settings override the preset.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Folder holding the domain folders (e.g. ../shared/data).")] = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder; running again resumes from its cache.")] = Path("study-out"),
    preset: Annotated[Optional[str], typer.Option("--preset", help="smoke (minutes, for checking), quick (the README's run, about 40 min on 2 CPU cores), standard (all five domains, about 1.5-2 h) or paper (the paper's scale, 3 seeds; for a GPU).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Override the config's base model.")] = None,
    domains: Annotated[Optional[str], typer.Option("--domains", help="Override the domains, comma-separated (e.g. math,medicine,finance,code).")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Where the built-in model is cached.")] = None,
    threads: Annotated[int, typer.Option("--threads", help="Torch CPU threads (0: torch's default).")] = 0,
) -> None:
    """Train per-domain adapters, sum them, compare with merged-data training, fit change vs overlap, unlearn.

    --out is resumed when it holds a lorablocks study and refused when it holds anything else."""
    from lorablocks.files.outputs import check_not_input
    from lorablocks.study.report import write_report
    from lorablocks.study.config import load_config
    from lorablocks.study.pipeline import run_study

    overrides: dict = {}
    if model:
        overrides["model"] = model
    if domains:
        overrides["domains"] = [d.strip() for d in domains.split(",") if d.strip()]
    if config is None and preset is None:
        preset = "quick"
    cfg = load_config(config, preset=preset, overrides=overrides)
    check_not_input(out, [p for p in (config, data) if p is not None])  # before any work: out never holds an input
    console.print(f"study: model {cfg.model}, domains {', '.join(cfg.domains)}, seeds {cfg.seeds}, out {out}",
                  highlight=False)
    result = run_study(cfg, data, out, cache_dir=cache_dir, threads=threads or None,
                       log=lambda msg: console.print(msg, highlight=False))
    command = "lorablocks " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = write_report(result, out, command=command)
    console.print(f"wrote [bold]{report}[/bold] (and results.json, results.csv, plots) in "
                  f"{result.timings.get('total_s', 0) / 60:.1f} min")


@app.command("analyse")
def analyse_cmd(
    study_dir: Annotated[Path, typer.Argument(help="A lorablocks study folder (the --out of `lorablocks study`).")],
    config: Annotated[Optional[Path], typer.Argument(help="The study's config (YAML), only for a study stopped before its report wrote config.yaml.")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help="The study's preset, only for a study stopped before its report wrote config.yaml.")] = None,
) -> None:
    """Re-run the analysis of a study from its cache and rewrite its report (seconds; no model, no data).

    Rewrites report.md, results.json, results.csv and the plots, each atomically; only in a lorablocks study folder."""
    import time

    from lorablocks.study.config import load_config
    from lorablocks.study.reanalyse import reanalyse
    from lorablocks.study.report import write_report

    t0 = time.perf_counter()
    cfg = load_config(config, preset=preset) if config is not None or preset is not None else None
    result = reanalyse(study_dir, cfg)
    old = (study_dir / "report.md").read_text() if (study_dir / "report.md").is_file() else ""
    command = next((line for line in old.split("## Reproduce", 1)[-1].splitlines() if line.startswith("lorablocks ")),
                   "lorablocks study ...")
    report = write_report(result, study_dir, command=command)
    console.print(f"wrote [bold]{report}[/bold] (and results.json, results.csv, plots) from the cache in "
                  f"{time.perf_counter() - t0:.1f} s", highlight=False)
