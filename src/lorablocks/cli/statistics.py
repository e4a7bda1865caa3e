"""The ``stats`` verb: collect a block's input statistics (for ``--method regmean``) and store them beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lorablocks.cli.app import app, console


@app.command("stats")
def stats_cmd(
    adapter: Annotated[Path, typer.Argument(help="Adapter folder (any PEFT LoRA adapter) the statistics are for.")],
    data: Annotated[str, typer.Option("--data", help="The block's domain: a folder with train/validation/test.jsonl, a .jsonl file or a hub name.")],
    model: Annotated[str, typer.Option("--model", help="Base model: smollm2-135m (built in), a local folder or a hub id.")] = "smollm2-135m",
    split: Annotated[str, typer.Option("--split", help="Split whose first examples are used (train, validation or test).")] = "train",
    limit: Annotated[Optional[int], typer.Option("--limit", help="First N examples of the split (then at most --tokens tokens).")] = None,
    tokens: Annotated[int, typer.Option("--tokens", help="Most tokens (prompt + answer) the statistics are collected on.")] = 4096,
    max_length: Annotated[int, typer.Option("--max-length", help="Max tokens per example; longer ones are truncated.")] = 256,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Cache root for the built-in model.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the block's existing lorablocks statistics file.")] = False,
) -> None:
    """Write ADAPTER/lorablocks_stats.safetensors: the Grams of each target module's inputs on --data (the
    block applied to the base model), so that `combine --method regmean` needs no model and no data."""
    from lorablocks.compose.statistics import write_block_statistics
    from lorablocks.errors import ConfigError
    from lorablocks.passes.statistics import StatsSettings

    if split not in ("train", "validation", "test"):
        raise ConfigError(f"split must be train, validation or test, got {split!r}", setting="split")
    if (limit is not None and limit < 1) or tokens < 1 or max_length < 16:
        raise ConfigError("--limit and --tokens must be positive and --max-length at least 16", setting="limit")
    settings = StatsSettings(split=split, limit=limit, max_tokens=tokens, max_length=max_length)
    stats = write_block_statistics(adapter, model, data, settings=settings, force=force, cache_dir=cache_dir)
    sites = stats.sites.values()
    console.print(f"wrote [bold]{stats.path}[/bold]: {len(stats.sites)} input sites for "
                  f"{sum(len(s.modules) for s in sites)} modules, {stats.data.get('tokens')} tokens of "
                  f"{stats.data.get('examples')} {split} examples (sha256 {stats.sha256[:12]})", highlight=False)
