"""Verbs for base models and training: ``prepare-model``, ``train`` (``eval`` lives in :mod:`.evaluation`).

Each parses its flags, calls one library function and prints. Several values may follow one flag
(``--data math medicine``) or the flag may be repeated (``--data math --data medicine``).
"""

from __future__ import annotations

import inspect
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lorablocks.cli.app import app, console
from lorablocks.errors import LoraBlocksError
from lorablocks.training.config import LoraSettings, OptimSettings, TrainConfig

_MULTI = {"allow_extra_args": True}


def _extras(ctx: typer.Context) -> list[str]:
    bad = [a for a in ctx.args if a.startswith("-")]
    if bad:
        raise LoraBlocksError(f"unknown option {bad[0]}; see --help")
    return list(ctx.args)


CacheOpt = Annotated[
    Optional[Path],
    typer.Option("--cache-dir", help="Cache root for the built-in model (default $LORABLOCKS_CACHE or ~/.cache/lorablocks)."),
]


@app.command("prepare-model")
def prepare_model_cmd(
    model: Annotated[str, typer.Option("--model", help="Built-in model to convert: smollm2-135m or gemma3-270m.")] = "smollm2-135m",
    cache_dir: CacheOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Convert again even if the cache folder exists.")] = False,
) -> None:
    """Convert a built-in model (GGUF in an installed package) once to a float32 folder, for offline use."""
    from lorablocks.model.models import builtin_path, prepare_model

    existed = (builtin_path(model, cache_dir) / "config.json").is_file() if model else False
    path = prepare_model(model, cache_dir=cache_dir, force=force)
    what = "ready (cached)" if existed and not force else "converted"
    console.print(f"{model}: {what} at [bold]{path}[/bold]", highlight=False)


#: Flag spellings other than ``--name-with-dashes``: short aliases, and ``--limit`` for ``train_limit``.
_TRAIN_FLAGS = {"r": ("--r", "--rank"), "learning_rate": ("--learning-rate", "--lr"), "train_limit": ("--limit",)}
#: Settings whose flag takes several values (``--data a b`` or ``--data a --data b``); other lists are comma-separated.
_TRAIN_MULTI = {"data"}


def _train_option(name: str) -> inspect.Parameter:
    """The ``train`` flag of one :class:`TrainConfig` setting: its type, help and default come from the field."""
    info = TrainConfig.model_fields[name]
    kind = info.annotation if info.annotation in (int, float, bool) else str
    if name in _TRAIN_MULTI:
        kind = list[str]
    elif int in typing.get_args(info.annotation):
        kind = int
    default = info.get_default(call_default_factory=True)
    shown = default is not None and default is not False and default not in ("", [])
    panel = "LoRA" if name in LoraSettings.model_fields else "Training" if name in OptimSettings.model_fields else "Run"
    option = typer.Option(*_TRAIN_FLAGS.get(name, ("--" + name.replace("_", "-"),)), rich_help_panel=panel,
                          help=f"{info.description} \\[default: {default}]" if shown else info.description)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[kind], option])


def train_cmd(ctx: typer.Context, config: Optional[Path] = None, quiet: bool = False, **settings: Any) -> None:
    """Train a LoRA adapter on one domain, or the merged-data adapter on several (balanced)."""
    from lorablocks.training.train import load_config, train_adapter

    settings["data"] = list(settings.get("data") or []) + _extras(ctx) or None
    cfg = load_config(config, settings)
    result = train_adapter(cfg, progress=not quiet)
    rec = result.record
    if rec["processes"] > 1 and int(os.environ.get("RANK", "0")) != 0:
        return
    val = rec["validation"][-1]["loss"] if rec["validation"] else float("nan")
    trunc = ", ".join(f"{d['name']} {d['train_truncated']}/{d['train_examples']}" for d in rec["domains"])
    console.print(
        f"wrote [bold]{result.adapter}[/bold]: {rec['steps']} steps, final train loss {result.final_train_loss:.4f}, "
        f"validation loss {val:.4f}, {rec['answer_tokens_per_second']:,.0f} answer tokens/s ({rec['precision']['used']}); "
        f"truncated at {cfg.max_length} tokens: {trunc}",
        highlight=False,
    )


def _train_signature() -> inspect.Signature:
    """``train_cmd``'s signature as Typer reads it: one flag per :class:`TrainConfig` setting (``None``: not
    given, so the config file or the default applies), plus ``--config`` and ``--quiet``."""
    first = ["data", "out", "model"]
    names = first + [n for n in TrainConfig.model_fields if n not in first]
    settings = [_train_option(n) for n in names]
    config = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[Path], typer.Option("--config", help="YAML/JSON file of settings (keys as the flags); flags override it.", rich_help_panel="Run")])
    quiet = inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, typer.Option("--quiet", help="No progress bar.", rich_help_panel="Run")])
    ctx = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    return inspect.Signature([ctx, *settings[:3], config, *settings[3:], quiet])


train_cmd.__signature__ = _train_signature()  # type: ignore[attr-defined]
app.command("train", context_settings=_MULTI)(train_cmd)
