"""Blocks for vLLM: a PEFT adapter folder that vLLM's LoRA loader accepts as is.

What vLLM's loader does with a PEFT folder (read from its source, ``vllm/lora/peft_helper.py``,
``lora_model.py``, ``worker_manager.py``, ``config`` ``LoRAConfig``; vLLM itself cannot run here):

* ``PEFTHelper.from_dict`` keeps only the fields it knows: ``rank_pattern``/``alpha_pattern`` are dropped
  silently, so every module is read at rank ``r`` and scaled by ``lora_alpha / r`` (``/ sqrt(r)`` with
  ``use_rslora``). An adapter with per-module ranks or alphas would load with wrong scales, or not at all.
  Written here: one rank for every module, ``lora_alpha == r`` (scale 1), each module's own scale folded
  into its ``A``.
* ``LoRA rank R is greater than max_lora_rank`` refuses ``r > --max-lora-rank``, which must be one of
  :data:`VLLM_MAX_RANKS` (default 16). Modules of a lower rank are padded with zero rows of ``A`` and zero
  columns of ``B`` (exact); modules of a higher rank are re-factored to the cap by
  :func:`lorablocks.core.algebra.compress` (truncated SVD of the factors) and the relative Frobenius error
  is reported.
* ``modules_to_save`` must be empty, DoRA is refused, a trained bias needs ``bias_enabled``: the adapter
  reader already refuses all three, so an exported folder never has them.
* Each tensor's module name must end in one of the model's LoRA modules (``expected_lora_modules``): for
  the Llama family (also Mistral, Qwen2/3, Gemma) ``q_proj k_proj v_proj o_proj gate_proj up_proj
  down_proj`` (vLLM packs them into ``qkv_proj``/``gate_up_proj``; a missing member is fine). Anything else
  (GPT-2's ``c_attn``, ``lm_head``) is refused with one line.
* Weights are read from ``adapter_model.safetensors`` and cast to ``lora_dtype`` (default: the model's);
  they are written here in float32.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from lorablocks.core import algebra
from lorablocks.core.algebra import LowRank
from lorablocks.errors import LoraBlocksError, UnsupportedAdapterError
from lorablocks.files.adapters import AdapterFile, open_adapter
from lorablocks.files.export_gguf import source_record
from lorablocks.files.outputs import check_output_free
from lorablocks.files.writer import AdapterWriter

__all__ = ["VLLM_MAX_RANKS", "VLLM_MODULES", "VllmExport", "uniform_rank", "export_vllm"]

#: ``--max-lora-rank`` values vLLM's LoRAConfig accepts.
VLLM_MAX_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
#: Module names vLLM loads LoRA for in the Llama family of models.
VLLM_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class VllmExport:
    """What was written: the folder, its one rank, how many modules were padded or truncated and the error."""

    path: Path
    rank: int
    modules: int
    padded: int
    truncated: int
    rel_error: float
    max_rel_error: float
    fingerprint: str
    #: the base model as vLLM names it (a hub id or folder), None when the adapter does not record it
    base_model: str | None = None

    def serve_command(self, name: str, model: str | None = None) -> str:
        """The ``vllm serve`` line that serves this adapter as ``name`` on ``model`` (default: its base)."""
        cap = next(r for r in VLLM_MAX_RANKS if r >= self.rank)
        return f"vllm serve {model or self.base_model or 'MODEL'} --enable-lora --max-lora-rank {cap} --lora-modules {name}={self.path.resolve()}"


def _check_modules(file: AdapterFile) -> None:
    if file.fan_in_fan_out:
        raise UnsupportedAdapterError(f"{file.path} stores transposed (fan_in_fan_out, GPT-2 Conv1D) factors; vLLM "
                                      "has no LoRA support for such models")
    for module in file.modules:
        kind = module.rsplit(".", 1)[-1]
        if kind not in VLLM_MODULES:
            raise UnsupportedAdapterError(f"{file.path}: module {module} ({kind}): vLLM loads LoRA for "
                                          f"{', '.join(VLLM_MODULES)} only")


def uniform_rank(delta: Mapping[str, LowRank], rank: int) -> tuple[dict[str, LowRank], algebra.CompressionReport]:
    """Every module at exactly ``rank``: lower ranks padded with zeros (exact), higher ones truncated by
    :func:`~lorablocks.core.algebra.compress` (error in the report). Zero modules are left out."""
    over = {m: x for m, x in delta.items() if x.rank > rank}
    cut, report = algebra.compress(over, rank=rank)
    exact = algebra.compress({m: x for m, x in delta.items() if x.rank <= rank}, rank="concat")[1]
    report.update(exact)
    out: dict[str, LowRank] = {}
    for module, x in delta.items():
        y = cut.get(module) if module in over else x
        if y is None or y.rank == 0:
            continue
        pad = rank - y.rank
        out[module] = LowRank(B=torch.cat([y.B, y.B.new_zeros(y.B.shape[0], pad)], 1),
                              A=torch.cat([y.A, y.A.new_zeros(pad, y.A.shape[1])], 0))
    return out, report


def export_vllm(adapter: str | os.PathLike, out: str | os.PathLike, *, max_lora_rank: int = 16,
                force: bool = False) -> VllmExport:
    """Write ``adapter`` (a block or a composition) as a PEFT folder vLLM serves as is (see the module docstring)."""
    if max_lora_rank not in VLLM_MAX_RANKS:
        raise LoraBlocksError(f"max_lora_rank must be one of {', '.join(map(str, VLLM_MAX_RANKS))} (vLLM's "
                              f"choices), got {max_lora_rank}", setting="max_lora_rank")
    file = open_adapter(adapter)
    check_output_free(out, force, kind="adapter", inputs=[file.path])
    _check_modules(file)
    delta = file.load().delta
    rank = min(max_lora_rank, max(x.rank for x in delta.values()))
    uniform, report = uniform_rank(delta, rank)
    src = source_record(file)
    with AdapterWriter(out, base_model=file.base_model, task_type=file.config.get("task_type", "CAUSAL_LM"),
                       force=force, inputs=[file.path]) as writer:
        for module, x in uniform.items():
            writer.add(module, x)
        writer.record = {"kind": "adapter", "format": "vllm", "max_lora_rank": max_lora_rank, "rank": rank,
                         "truncation": report.to_dict(), **src}
    return VllmExport(Path(out), rank, len(uniform), sum(x.rank < rank for x in delta.values()),
                      sum(x.rank > rank for x in delta.values()), report.overall_rel_error, report.max_rel_error,
                      src["fingerprint"], _vllm_model_name(file.base_model))


def _vllm_model_name(base: str | None) -> str | None:
    """A built-in model by its hub id (vLLM loads hub ids or folders), anything else as recorded."""
    from lorablocks.model.models import BUILTIN_MODELS

    builtin = BUILTIN_MODELS.get(base or "")
    return builtin.aliases[0] if builtin is not None and builtin.aliases else base
