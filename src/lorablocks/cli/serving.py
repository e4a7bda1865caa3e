"""Verbs for using a combination live: ``generate`` (streamed to stdout) and ``serve`` (OpenAI-compatible
server whose blocks change in place). Parse, call the library, print."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from lorablocks.cli import raise_on_interrupt
from lorablocks.cli.app import app, console
from lorablocks.cli.options import (AllowBaseOpt, AlphaOpt, DensityOpt, MajorityOpt, MethodOpt, SpaceOpt,
                                    WeightsOpt, method_params, parse_weights)
from lorablocks.errors import LoraBlocksError

ModelOpt = Annotated[str, typer.Option("--model", help="Base model: smollm2-135m (built in), a local folder or a hub id.")]
CacheOpt = Annotated[Optional[Path], typer.Option("--cache-dir", help="Cache root for the built-in model (default $LORABLOCKS_CACHE or ~/.cache/lorablocks).")]


def parse_active(text: Optional[str]) -> tuple[tuple[str, float], ...]:
    """``--active math,medicine:0.5,finance:-1``: block names with optional weights (default 1)."""
    out: list[tuple[str, float]] = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, weight = item.rpartition(":")
        if not sep:
            name, weight = item, "1"
        try:
            value = float(weight)
        except ValueError:
            raise LoraBlocksError(f"--active takes NAME[:WEIGHT],...; {weight!r} in {item!r} is not a number (a block "
                                  "whose name holds ':' takes its weight after it: NAME:1)") from None
        if not math.isfinite(value):
            raise LoraBlocksError(f"--active weights must be finite numbers, got {item!r}")
        out.append((name, value))
    return tuple(out)


def _prompt_mode(raw: bool, template: Optional[str]) -> str:
    if template is not None:
        if template != "qa":
            raise LoraBlocksError(f"--template takes qa (Question: ...\\nAnswer:), got {template!r}")
        return "qa"
    return "raw" if raw else "auto"


@app.command("generate")
def generate_cmd(
    prompt: Annotated[str, typer.Argument(help="The prompt (a user message, or with --raw the text to continue).")],
    model: ModelOpt = "smollm2-135m",
    adapter: Annotated[Optional[list[Path]], typer.Option("--adapter", help="Adapter folder merged into the weights (repeat for a combination).")] = None,
    weights: WeightsOpt = None,
    method: MethodOpt = "sum",
    density: DensityOpt = None,
    space: SpaceOpt = None,
    majority_sign: MajorityOpt = None,
    alpha: AlphaOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="0: greedy and deterministic; > 0: sampling.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling: keep the smallest set of tokens of this total probability.")] = 1.0,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of sampling (the same seed gives the same text).")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Continue the prompt as plain text (no chat template).")] = False,
    template: Annotated[Optional[str], typer.Option("--template", help="qa: the study's 'Question: ...\\nAnswer:' template (plain completion).")] = None,
    allow_base_mismatch: AllowBaseOpt = False,
    cache_dir: CacheOpt = None,
) -> None:
    """Stream the model's answer to stdout, with the adapters' combination merged into the weights."""
    from lorablocks.serving.blocks import open_composed
    from lorablocks.serving.generation import SamplingParams, check_length, encode_prompt, generate_stream

    adapters = list(adapter or [])
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    mode = _prompt_mode(raw, template)
    composed = open_composed(model, adapters, parse_weights(weights, len(adapters)), method=method,
                             params=method_params(density=density, space=space, majority_sign=majority_sign,
                                                  alpha=alpha),
                             allow_base_mismatch=allow_base_mismatch, cache_dir=cache_dir)
    ids = encode_prompt(composed.tokenizer, prompt, mode)  # type: ignore[arg-type]
    check_length(composed.model, len(ids), params.max_new_tokens)
    t0, tokens, reason = time.perf_counter(), 0, "length"
    for chunk in generate_stream(composed.model, composed.tokenizer, ids, params):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        tokens, reason = chunk.tokens, chunk.finish_reason or reason
    sys.stdout.write("\n")
    seconds = time.perf_counter() - t0
    console.print(f"{tokens} tokens in {seconds:.2f} s ({tokens / max(seconds, 1e-9):.1f} tokens/s, {reason}); "
                  f"composition {(composed.fingerprint or 'base')[:12]}", highlight=False)


@app.command("serve")
def serve_cmd(
    blocks: Annotated[Path, typer.Option("--blocks", help="Folder whose adapter sub-folders are the available blocks (by folder name).")],
    model: ModelOpt = "smollm2-135m",
    host: Annotated[str, typer.Option("--host", help="Address to listen on (default: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port (0: any free port).")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="LORABLOCKS_API_KEY", help="Require 'Authorization: Bearer KEY' on every endpoint (to generate and read; not to change the composition).")] = None,
    admin_key: Annotated[Optional[str], typer.Option("--admin-key", envvar="LORABLOCKS_ADMIN_KEY", help="Key that changing the composition (PUT/POST/DELETE /v1/blocks) needs. Without it: with --api-key, no changes over HTTP; with no key at all, changes only from this machine (loopback).")] = None,
    allowed_host: Annotated[Optional[list[str]], typer.Option("--allowed-host", help="Host name clients may use besides localhost, 127.0.0.1, [::1] and --host (repeat); others get 421 (DNS rebinding).")] = None,
    max_body_bytes: Annotated[int, typer.Option("--max-body-bytes", help="Largest request body (more: 413, refused while it arrives).")] = 1 << 20,
    max_tokens_limit: Annotated[int, typer.Option("--max-tokens-limit", help="Largest max_tokens a request may ask for.")] = 512,
    active: Annotated[Optional[str], typer.Option("--active", help="Composition at start: NAME[:WEIGHT],... (default: the base model).")] = None,
    method: MethodOpt = "sum",
    density: DensityOpt = None,
    space: SpaceOpt = None,
    majority_sign: MajorityOpt = None,
    alpha: AlphaOpt = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Generations decoded together, one step at a time (continuous batching; a change of composition cuts the running ones, finish_reason composition_changed). 0: a thread per generation (--workers), changes wait for them.")] = 16,
    workers: Annotated[int, typer.Option("--workers", help="With --max-batch 0: generations run at once, each on its own thread.")] = 4,
    queue: Annotated[int, typer.Option("--queue", help="Generations that may wait beyond those (more: 503).")] = 32,
    max_compositions: Annotated[int, typer.Option("--max-compositions", help="Compositions requests may name in their model field ('math+medicine:0.5'), served unmerged from the blocks' factors beside the merged default, held at once (all in use: 503). 0: off. Needs --max-batch > 0.")] = 4,
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch threads per generation (default: torch's; 1 suits several generations on few cores).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Weights' dtype: float32 (exact merges) or bfloat16 (half the bytes per decoding step: with native bf16, e.g. avx512_bf16 or a GPU, a batched step of 8 costs about one of 1; merges are computed in float32, then rounded; fingerprints name the dtype).")] = "float32",
    cache_dir: CacheOpt = None,
) -> None:
    """OpenAI-compatible server (/v1/completions, /v1/chat/completions) whose blocks change live (/v1/blocks).

    Refused: a Host not listed (421), a body over --max-body-bytes (413), a POST/PUT body that is not
    'Content-Type: application/json' (415), a change of composition without the admin key (or, with no key
    at all, from another machine: 403). A failed change changes nothing. Every change composes the active
    blocks by --method (regmean: from each block's stored input statistics; a block without them is refused).
    """
    from lorablocks.serving.server import ServeSettings, serve

    if not 0 <= port <= 65535:
        raise LoraBlocksError(f"--port must be in 0..65535, got {port}")
    if min(max_tokens_limit, workers) < 1 or min(queue, max_batch, max_compositions) < 0 or (threads is not None and threads < 1):
        raise LoraBlocksError("--max-tokens-limit, --workers and --threads must be positive, --queue, "
                              "--max-batch and --max-compositions not negative")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    settings = ServeSettings(blocks=str(blocks), model=model, host=host, port=port, api_key=api_key,
                             admin_key=admin_key, allowed_hosts=tuple(allowed_host or ()),
                             max_body_bytes=max_body_bytes, max_tokens_limit=max_tokens_limit,
                             active=parse_active(active), max_batch=max_batch, workers=workers, queue=queue,
                             max_compositions=max_compositions, dtype=dtype,
                             cache_dir=str(cache_dir) if cache_dir else None, method=method,
                             params=method_params(density=density, space=space, majority_sign=majority_sign,
                                                  alpha=alpha))
    serving = []

    def announce(line: str) -> None:
        serving.append(line)
        raise_on_interrupt()  # from the first line on, Ctrl-C is how the server is stopped (exit 0)
        console.print(line, highlight=False, soft_wrap=True)

    try:
        serve(settings, announce=announce)
    except KeyboardInterrupt:
        if not serving:  # interrupted while loading: 130 and one line, like every verb
            raise
    console.print("stopped", highlight=False)
