"""The ``export`` verb: a block or a composition for llama.cpp (GGUF adapter or merged model) or vLLM."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lorablocks.cli.app import app, console
from lorablocks.cli.options import ForceOpt
from lorablocks.errors import LoraBlocksError

FORMATS = ("gguf", "gguf-model", "vllm")


@app.command("export")
def export_cmd(
    adapter: Annotated[Path, typer.Argument(help="Adapter folder: a block, or a composition written by combine.")],
    fmt: Annotated[str, typer.Option("--format", help="gguf (llama.cpp LoRA adapter), gguf-model (merged full model GGUF) or vllm (PEFT folder vLLM serves as is).")],
    out: Annotated[Path, typer.Option("--out", help="Output: a .gguf file, or a folder for vllm.")],
    model: Annotated[Optional[str], typer.Option("--model", help="gguf/gguf-model: the Llama base model (built-in name or local folder); default: the adapter's recorded base, else smollm2-135m.")] = None,
    outtype: Annotated[Optional[str], typer.Option("--outtype", help="gguf: f32 (default) or f16; gguf-model: f16 (default) or f32.")] = None,
    base_gguf: Annotated[Optional[Path], typer.Option("--base-gguf", help="gguf-model: a GGUF of the same base model whose tokenizer and metadata are copied (built-in models have their own).")] = None,
    max_lora_rank: Annotated[int, typer.Option("--max-lora-rank", help="vllm: the rank cap vLLM is started with (8, 16, 32, 64, ...); higher ranks are truncated, error reported.")] = 16,
    allow_base_mismatch: Annotated[bool, typer.Option("--allow-base-mismatch", help="gguf/gguf-model: export against --model although the adapter records another base model (shapes are still checked).")] = False,
    force: ForceOpt = False,
) -> None:
    """Export a block or composition to another engine: llama.cpp (GGUF) or vLLM (PEFT folder)."""
    if fmt not in FORMATS:
        raise LoraBlocksError(f"must be one of {', '.join(FORMATS)}, got {fmt!r}", setting="format")
    if fmt == "vllm":
        unused = [f for f, v in (("--model", model), ("--outtype", outtype), ("--base-gguf", base_gguf),
                                 ("--allow-base-mismatch", allow_base_mismatch)) if v]
        if unused:
            raise LoraBlocksError(f"{unused[0]} is for the gguf formats only")
        _export_vllm(adapter, out, max_lora_rank, force)
        return
    if base_gguf is not None and fmt != "gguf-model":
        raise LoraBlocksError("--base-gguf is for --format gguf-model only")
    from lorablocks.files.export_gguf import export_adapter_gguf, export_model_gguf

    if fmt == "gguf":
        result = export_adapter_gguf(adapter, out, model=model, outtype=outtype or "f32",
                                     allow_base_mismatch=allow_base_mismatch, force=force)
        console.print(f"wrote llama.cpp LoRA adapter [bold]{out}[/bold] ({result.outtype}): {result.modules} modules, "
                      f"adapter.lora.alpha {result.alpha:g}; fingerprint {_short(result.fingerprint)}", highlight=False, soft_wrap=True)
        console.print(f"use: llama-cli -m BASE.gguf --lora {out}   (or --lora-scaled {out} SCALE)", highlight=False, soft_wrap=True)
        return
    result = export_model_gguf(adapter, out, model=model, outtype=outtype or "f16", base_gguf=base_gguf,
                               allow_base_mismatch=allow_base_mismatch, force=force,
                               log=lambda message: console.print(message, highlight=False, soft_wrap=True))
    console.print(f"wrote merged model GGUF [bold]{out}[/bold] ({result.outtype}): {result.tensors} tensors, "
                  f"{result.modules} modules changed; fingerprint {_short(result.fingerprint)}", highlight=False, soft_wrap=True)
    console.print(f"use: llama-cli -m {out}   or, for ollama, a Modelfile with: FROM {out.resolve()}", highlight=False, soft_wrap=True)


def _short(fingerprint: str) -> str:
    """A fingerprint as the other verbs print it (12 hex digits; a block's weights hash keeps its prefix)."""
    return fingerprint[:19] if fingerprint.startswith("sha256:") else fingerprint[:12]


def _export_vllm(adapter: Path, out: Path, max_lora_rank: int, force: bool) -> None:
    from lorablocks.files.export_vllm import export_vllm

    result = export_vllm(adapter, out, max_lora_rank=max_lora_rank, force=force)
    parts = [f"{result.padded} zero-padded (exact)"] if result.padded else []
    if result.truncated:
        parts.append(f"{result.truncated} truncated to rank {result.rank}: relative Frobenius error "
                     f"{result.rel_error:.3g} (worst module {result.max_rel_error:.3g})")
    how = "; ".join(parts) or "exact"
    console.print(f"wrote vLLM adapter [bold]{out}[/bold]: {result.modules} modules at rank {result.rank} "
                  f"({how}); fingerprint {_short(result.fingerprint)}", highlight=False, soft_wrap=True)
    print(result.serve_command(Path(out).name))
