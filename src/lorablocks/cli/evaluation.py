"""The ``eval`` verb: parse, call :func:`lorablocks.passes.eval_job.run_evaluation`, print."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from lorablocks.cli.app import app, console
from lorablocks.cli.options import (AlphaOpt, DensityOpt, MajorityOpt, MethodOpt, SpaceOpt, WeightsOpt, method_params,
                                    parse_weights)
from lorablocks.errors import LoraBlocksError

_MULTI = {"allow_extra_args": True}


def _score_table(result, split: str) -> Table:
    table = Table(title=f"perplexity ({split}, answer tokens only)")
    for col in ("domain", "perplexity", "mean NLL", "tokens", "examples", "truncated"):
        table.add_column(col, justify="left" if col == "domain" else "right")
    for name, s in [*result.domains.items(), ("joint", result.joint)]:
        table.add_row(name, f"{s.perplexity:.4f}", f"{s.mean_nll:.4f}", str(s.tokens), str(s.examples), str(s.truncated))
    return table


@app.command("eval", context_settings=_MULTI)
def eval_cmd(
    ctx: typer.Context,
    data: Annotated[Optional[list[str]], typer.Option("--data", help="Domain(s) to evaluate (folders, .jsonl files or hub names).")] = None,
    model: Annotated[str, typer.Option("--model", help="Base model: smollm2-135m (built in), a local folder or a hub id.")] = "smollm2-135m",
    adapter: Annotated[Optional[list[Path]], typer.Option("--adapter", help="Adapter folder(s) merged into the weights (their composition).")] = None,
    weights: WeightsOpt = None,
    method: MethodOpt = "sum",
    density: DensityOpt = None,
    space: SpaceOpt = None,
    majority_sign: MajorityOpt = None,
    alpha: AlphaOpt = None,
    split: Annotated[str, typer.Option("--split", help="train, validation or test.")] = "test",
    limit: Annotated[Optional[int], typer.Option("--limit", help="First N examples per domain.")] = None,
    max_length: Annotated[int, typer.Option("--max-length", help="Max tokens per example; longer ones are truncated and counted.")] = 512,
    batch_tokens: Annotated[int, typer.Option("--batch-tokens", help="Max padded tokens per batch.")] = 4096,
    precision: Annotated[str, typer.Option("--precision", help="auto (bf16 where the CPU/GPU has it natively), fp32 or bf16; the head and the NLL stay fp32.")] = "auto",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON here.")] = None,
    allow_base_mismatch: Annotated[bool, typer.Option("--allow-base-mismatch", "--ignore-base-model", help="Evaluate adapters whose configs record another base model (shapes are still checked).")] = False,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Cache root for the built-in model.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --json file.")] = False,
) -> None:
    """Per-domain and joint token-weighted perplexity, with the adapters' composition merged in."""
    from lorablocks.files.outputs import check_output_free, write_json
    from lorablocks.passes.eval_job import EvalRequest, run_evaluation, split_adapters_and_domains

    extra = [a for a in ctx.args if a.startswith("-")]
    if extra:
        raise LoraBlocksError(f"unknown option {extra[0]}; see --help")
    more_adapters, more_domains = split_adapters_and_domains(list(ctx.args))
    adapters = [str(a) for a in adapter or []] + more_adapters
    if json_out is not None:  # refused before any work when it is, or lies inside, an input
        inputs = [p for p in [*adapters, *(data or []), *more_domains, model] if Path(p).exists()]
        check_output_free(json_out, force, kind="file", inputs=inputs)
    request = EvalRequest(
        domains=list(data or []) + more_domains, model=model, adapters=adapters, method=method,
        params=method_params(density=density, space=space, majority_sign=majority_sign, alpha=alpha),
        weights=parse_weights(weights, len(adapters)) if adapters else (None if weights is None else []),
        split=split, limit=limit, max_length=max_length, batch_tokens=batch_tokens,
        allow_base_mismatch=allow_base_mismatch, cache_dir=cache_dir, precision=precision)
    report = run_evaluation(request)
    console.print(_score_table(report.result, split))
    if json_out is not None:
        write_json(json_out, report.record, force=force)
        console.print(f"wrote [bold]{json_out}[/bold]", highlight=False)
