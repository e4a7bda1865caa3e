"""Verbs on adapter files: combine, subtract, similarity, inspect. Parse, call the library, print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from lorablocks.compose import operations as compose
from lorablocks.cli.app import app, console
from lorablocks.files.outputs import check_output_free, write_json

RankOpt = Annotated[str, typer.Option("--rank", help="concat (exact, rank sum r), minimal (exact, smallest rank) or N (truncate; error reported).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace the output if it exists.")]
RtolOpt = Annotated[float, typer.Option("--rtol", help="minimal rank: drop singular values below rtol * largest.")]


def _print_combine(result: compose.CombineResult, out: Path, what: str) -> None:
    rep = result.report
    ranks_in = sum(rep.rank_in.values())
    ranks_out = sum(rep.rank_out.values())
    console.print(
        f"wrote {what} [bold]{out}[/bold]: {sum(r > 0 for r in rep.rank_out.values())} modules, total rank {ranks_in} -> {ranks_out} "
        f"({rep.mode}), relative Frobenius error {rep.overall_rel_error:.3g} "
        f"(worst module {rep.max_rel_error:.3g})",
        highlight=False,
    )


@app.command("combine")
def combine_cmd(
    adapters: Annotated[list[Path], typer.Argument(help="PEFT LoRA adapter folders.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (adapter, or model with --merge-into).")],
    weights: Annotated[Optional[str], typer.Option("--weights", help="Comma-separated weights, e.g. 1,1,-1 (default all 1).")] = None,
    rank: RankOpt = "minimal",
    rtol: RtolOpt = 1e-6,
    merge_into: Annotated[Optional[Path], typer.Option("--merge-into", help="Write a full model: this base model folder plus the combined delta.")] = None,
    force: ForceOpt = False,
) -> None:
    """Exact weighted sum of LoRA adapters (sum_i w_i B_i A_i), written as one adapter or merged model."""
    w = compose.parse_weights(weights, len(adapters))
    result = compose.combine_files(adapters, out, weights=w, rank=compose.parse_rank(rank), rtol=rtol,
                                   merge_into=merge_into, force=force)
    _print_combine(result, out, "merged model" if merge_into else "adapter")


@app.command("subtract")
def subtract_cmd(
    a: Annotated[Path, typer.Argument(help="Adapter to subtract from (e.g. a sum of domains).")],
    b: Annotated[Path, typer.Argument(help="Adapter to remove (e.g. one domain).")],
    out: Annotated[Path, typer.Option("--out", help="Output adapter folder.")],
    rank: RankOpt = "minimal",
    rtol: RtolOpt = 1e-6,
    force: ForceOpt = False,
) -> None:
    """A - B exactly (unlearning B); the cancelled rank disappears with --rank minimal."""
    result = compose.combine_files([a, b], out, weights=[1.0, -1.0], rank=compose.parse_rank(rank), rtol=rtol, force=force)
    _print_combine(result, out, "adapter")


@app.command("similarity")
def similarity_cmd(
    adapters: Annotated[list[Path], typer.Argument(help="Two or more adapter folders.")],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the matrices and per-module cosines here.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write an RMS-cosine heatmap (PNG) here.")] = None,
    force: ForceOpt = False,
) -> None:
    """Overlap of adapters: RMS and signed mean cosine of their deltas, per pair and per module."""
    for p in (json_out, plot):
        if p is not None:
            check_output_free(p, force)
    rep = compose.similarity_report(adapters)
    names = [Path(a).name for a in rep["adapters"]]
    table = Table(title="RMS cosine (signed mean cosine)")
    table.add_column("")
    for n in names:
        table.add_column(n, justify="right")
    for i, n in enumerate(names):
        cells = []
        for j in range(len(names)):
            r, m = rep["rms_cosine"][i][j], rep["mean_cosine"][i][j]
            cells.append("-" if r is None else f"{r:.4f} ({m:+.4f})")
        table.add_row(n, *cells)
    console.print(table)
    console.print(f"set of {len(names)}: RMS cosine {rep['set']['rms_cosine']}, mean cosine {rep['set']['mean_cosine']}",
                  highlight=False)
    if json_out is not None:
        write_json(json_out, rep, force=force)
        console.print(f"wrote {json_out}")
    if plot is not None:
        from lorablocks.study.plots import heatmap

        heatmap(rep["rms_cosine"], names, plot, force=force)
        console.print(f"wrote {plot}")


@app.command("inspect")
def inspect_cmd(
    adapter: Annotated[Path, typer.Argument(help="Adapter folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the full report as JSON on stdout.")] = False,
) -> None:
    """An adapter's config and, per module, its shape, rank, scale, norm and effective rank."""
    rep = compose.inspect_report(adapter)
    if as_json:
        print(json.dumps(rep, indent=2))
        return
    console.print(
        f"{rep['path']}: base {rep['base_model']}, r={rep['r']}, alpha={rep['lora_alpha']}, "
        f"rslora={rep['use_rslora']}, {rep['n_modules']} modules, |dW| = {rep['total_norm']:.4g}",
        highlight=False,
    )
    table = Table()
    for col in ("module", "shape", "rank", "scale", "norm", "eff. rank"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for m, v in rep["modules"].items():
        table.add_row(m, "x".join(map(str, v["shape"])), str(v["rank"]), f"{v['scale']:.4g}",
                      f"{v['norm']:.4g}", f"{v['effective_rank']:.2f}")
    console.print(table)
