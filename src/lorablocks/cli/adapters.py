"""Verbs on adapter files: combine, subtract, similarity, inspect. Parse, call the library, print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from lorablocks.cli.app import app, console
from lorablocks.cli.options import (AllowBaseOpt, AlphaOpt, DensityOpt, ForceOpt, FractionOpt, MajorityOpt, MergeOpt, MethodOpt,
                                    RankOpt, RtolOpt, SeedOpt, SpaceOpt, WeightsOpt, method_params, parse_rank,
                                    parse_weights)
from lorablocks.compose import operations
from lorablocks.compose.recipe import Composition


def _print_combine(result: Composition, out: Path, what: str) -> None:
    rep = result.report
    console.print(
        f"wrote {what} [bold]{out}[/bold] ({result.recipe.method}): {sum(r > 0 for r in rep.rank_out.values())} modules, "
        f"total rank {sum(rep.rank_in.values())} -> {sum(rep.rank_out.values())} ({rep.mode}), relative Frobenius "
        f"error {rep.overall_rel_error:.3g} (worst module {rep.max_rel_error:.3g}); fingerprint {result.recipe.fingerprint()[:12]}",
        highlight=False,
    )


@app.command("combine")
def combine_cmd(
    adapters: Annotated[list[Path], typer.Argument(help="PEFT LoRA adapter folders.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (adapter, or model with --merge-into).")],
    weights: WeightsOpt = None,
    method: MethodOpt = "sum",
    density: DensityOpt = None,
    space: SpaceOpt = None,
    majority_sign: MajorityOpt = None,
    seed: SeedOpt = None,
    fraction: FractionOpt = None,
    merge: MergeOpt = None,
    alpha: AlphaOpt = None,
    rank: RankOpt = "minimal",
    rtol: RtolOpt = 1e-6,
    model: Annotated[Optional[str], typer.Option("--model", help="learned: the base model the weights are fitted on; regmean: the model statistics are collected with.")] = None,
    data: Annotated[Optional[list[str]], typer.Option("--data", help="learned: domain(s) whose validation examples fit the weights; regmean: one domain per adapter, for adapters without stored statistics (repeat the flag).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="learned: optimizer steps [20].")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="learned: examples per domain, a quarter held out [16].")] = None,
    merge_into: Annotated[Optional[Path], typer.Option("--merge-into", help="Write a full model: this base model folder plus the combined delta.")] = None,
    allow_base_mismatch: AllowBaseOpt = False,
    force: ForceOpt = False,
) -> None:
    """Weighted composition of LoRA adapters (default: the exact sum sum_i w_i B_i A_i), as one adapter or merged model."""
    w = parse_weights(weights, len(adapters))
    if method == "learned":
        _combine_learned(adapters, out, w, parse_rank(rank), rtol, model, data, steps, limit, allow_base_mismatch, force)
        return
    given = [f for f, v in (("--model", model), ("--data", data), ("--steps", steps), ("--limit", limit)) if v]
    if given and not (method == "regmean" and given[0] in ("--model", "--data") and not (steps or limit)):
        raise typer.BadParameter(f"{given[0]} is for --method learned only" + (" (and --model/--data for regmean)"
                                                                               if given[0] in ("--model", "--data") else ""))
    request = operations.CombineRequest(
        weights=w, method=method, rank=parse_rank(rank), rtol=rtol,
        params=method_params(density=density, space=space, majority_sign=majority_sign, seed=seed,
                             fraction=fraction, merge=merge, alpha=alpha),
        allow_base_mismatch=allow_base_mismatch, data=tuple(data or ()), model=model)
    result = operations.combine_files(adapters, out, request, merge_into=merge_into, force=force)
    _print_combine(result, out, "merged model" if merge_into else "adapter")


def _combine_learned(adapters, out, weights, rank, rtol, model, data, steps, limit, allow_base_mismatch, force) -> None:
    from lorablocks.training.learned import LearnSettings, combine_learned

    defaults = LearnSettings()
    settings = LearnSettings(steps=defaults.steps if steps is None else steps,
                             limit=defaults.limit if limit is None else limit)
    result, fit = combine_learned([str(a) for a in adapters], str(out), data=data or [], model=model or "smollm2-135m",
                                  weights=weights, rank=rank, rtol=rtol, settings=settings,
                                  allow_base_mismatch=allow_base_mismatch, force=force,
                                  log=lambda m: console.print(m, highlight=False))
    _print_combine(result, out, "adapter")
    verdict = "improved" if fit.improved else "did not improve: the start weights were kept"
    console.print(f"learned weights {verdict}: held-out loss {fit.heldout_start:.4f} -> {fit.heldout_best:.4f} "
                  f"(best at step {fit.best_step} of {fit.steps_run}, {fit.seconds:.0f} s)", highlight=False)


@app.command("subtract")
def subtract_cmd(
    a: Annotated[Path, typer.Argument(help="Adapter to subtract from (e.g. a sum of domains).")],
    b: Annotated[Path, typer.Argument(help="Adapter to remove (e.g. one domain).")],
    out: Annotated[Path, typer.Option("--out", help="Output adapter folder.")],
    rank: RankOpt = "minimal",
    rtol: RtolOpt = 1e-6,
    allow_base_mismatch: AllowBaseOpt = False,
    force: ForceOpt = False,
) -> None:
    """A - B exactly (unlearning B); the cancelled rank disappears with --rank minimal."""
    request = operations.CombineRequest(weights=[1.0, -1.0], rank=parse_rank(rank), rtol=rtol,
                                        allow_base_mismatch=allow_base_mismatch)
    result = operations.combine_files([a, b], out, request, force=force)
    _print_combine(result, out, "adapter")


def _similarity_table(rep: dict) -> Table:
    names = [Path(a).name for a in rep["adapters"]]
    table = Table(title="RMS cosine (signed mean cosine)")
    table.add_column("")
    for n in names:
        table.add_column(n, justify="right")
    for i, n in enumerate(names):
        cells = ["-" if r is None else f"{r:.4f} ({m:+.4f})"
                 for r, m in zip(rep["rms_cosine"][i], rep["mean_cosine"][i])]
        table.add_row(n, *cells)
    return table


def _interference_table(rep: dict) -> Table:
    names = [Path(a).name for a in rep["adapters"]]
    fo = rep["function_overlap"]
    table = Table(title="function overlap I(row -> column): block row's output energy on column's domain inputs, "
                        "relative to column's own block")
    table.add_column("block \\ inputs of")
    for n, d in zip(names, fo["probe_domains"]):
        table.add_column(f"{n} ({d})", justify="right")
    for j, n in enumerate(names):
        table.add_row(n, *[f"{fo['interference'][j][i]:.4f}" for i in range(len(names))])
    return table


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


@app.command("similarity")
def similarity_cmd(
    adapters: Annotated[list[Path], typer.Argument(help="Two or more adapter folders.")],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the matrices and per-module cosines here.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write an RMS-cosine heatmap (PNG) here.")] = None,
    probe_data: Annotated[Optional[list[str]], typer.Option("--probe-data", help="One domain per adapter (same order): also print the function overlap I(j -> i) on its inputs. Needs --model.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Base model for --probe-data.")] = None,
    probe_limit: Annotated[int, typer.Option("--probe-limit", help="Validation examples per probe domain.")] = 16,
    allow_base_mismatch: AllowBaseOpt = False,
    force: ForceOpt = False,
) -> None:
    """Overlap of adapters: RMS and signed mean cosine of their deltas, per pair and per module; with
    --probe-data, also how strongly each block acts on the others' domain inputs (function overlap)."""
    from lorablocks.files.outputs import check_output_free, write_json

    if json_out is not None and plot is not None and Path(json_out).resolve() == Path(plot).resolve():
        raise typer.BadParameter("--json and --plot must be different files")
    inputs = [*adapters, *([model] if model and Path(model).exists() else [])]
    for p in (json_out, plot):
        if p is not None:
            check_output_free(p, force, kind="file", inputs=inputs)  # before any work
    if probe_data and not model:
        raise typer.BadParameter("--probe-data needs --model (the base model whose inputs are probed)")
    rep = operations.similarity_report(adapters, allow_base_mismatch=allow_base_mismatch)
    console.print(_similarity_table(rep))
    if probe_data:
        from lorablocks.passes.probe import probe_adapters

        rep["function_overlap"] = probe_adapters([str(a) for a in adapters], model, probe_data, limit=probe_limit,
                                                 allow_base_mismatch=allow_base_mismatch)
        console.print(_interference_table(rep))
    console.print(f"set of {len(rep['adapters'])}: RMS cosine {_fmt(rep['set']['rms_cosine'])}, "
                  f"mean cosine {_fmt(rep['set']['mean_cosine'])}", highlight=False)
    if json_out is not None:
        write_json(json_out, rep, force=force)
        console.print(f"wrote {json_out}")
    if plot is not None:
        from lorablocks.study.plots import heatmap

        heatmap(rep["rms_cosine"], [Path(a).name for a in rep["adapters"]], plot, force=force)
        console.print(f"wrote {plot}")


@app.command("inspect")
def inspect_cmd(
    adapter: Annotated[Path, typer.Argument(help="Adapter folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the full report as JSON on stdout.")] = False,
) -> None:
    """An adapter's config and, per module, its shape, rank, scale, norm and effective rank."""
    rep = operations.inspect_report(adapter)
    if as_json:
        print(json.dumps(rep, indent=2))
        return
    console.print(f"{rep['path']}: base {rep['base_model']}, r={rep['r']}, alpha={rep['lora_alpha']}, "
                  f"rslora={rep['use_rslora']}, {rep['n_modules']} modules, |dW| = {rep['total_norm']:.4g}",
                  highlight=False)
    table = Table()
    for col in ("module", "shape", "rank", "scale", "norm", "eff. rank"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for m, v in rep["modules"].items():
        table.add_row(m, "x".join(map(str, v["shape"])), str(v["rank"]), f"{v['scale']:.4g}",
                      f"{v['norm']:.4g}", f"{v['effective_rank']:.2f}")
    console.print(table)
