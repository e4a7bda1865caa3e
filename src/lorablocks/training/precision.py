"""Numeric precision of training: float32, or bfloat16 autocast where the hardware computes it natively.

One setting, ``precision: auto | fp32 | bf16`` (declared in :class:`~lorablocks.training.config.OptimSettings`),
and one decision, :func:`resolve_precision`:

- ``fp32``: everything in float32;
- ``bf16``: the forward pass under ``torch.autocast(device_type, dtype=torch.bfloat16)``; where the device
  has no native bf16 this falls back to float32 with one warning line (emulated bf16 is slower than fp32);
- ``auto``: ``bf16`` where the device has it natively, else float32, silently.

bf16 never touches the parameters: the LoRA factors, their gradients and the optimizer state stay float32
(autocast casts a copy of each weight per matrix product); the cross-entropy runs in float32, and measured
losses (validation, evaluation) take float32 logits (:class:`~lorablocks.training.loss.AnswerNLL`). On a
CPU, attention stays float32 too (:meth:`ResolvedPrecision.attention`): there the bf16 attention backward
was 3x slower than float32's (SmolLM2-135M, batch 8 x 128, AVX-512 BF16 without AMX), which cut the
training speed-up from about 1.45x to 1.3x.

Native bf16 means: CUDA ``torch.cuda.is_bf16_supported()`` without emulation; CPU ``avx512_bf16`` or
``amx_bf16`` among the x86 flags of ``/proc/cpuinfo`` (``bf16`` among an Arm CPU's features), or torch's
own CPU capability checks where there is no ``/proc/cpuinfo``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

import torch

from lorablocks.training.config import Precision

__all__ = ["Precision", "PRECISIONS", "ResolvedPrecision", "native_bf16", "resolve_precision"]

PRECISIONS: tuple[str, ...] = typing.get_args(Precision)

#: CPU feature flags that mean bf16 matrix products run natively (x86: AVX-512 BF16, AMX; Arm: BF16).
_CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}

log = logging.getLogger("lorablocks.precision")


@dataclass(frozen=True)
class ResolvedPrecision:
    """What a run computes in: ``name`` (``fp32`` or ``bf16``) on ``device_type``, asked as ``setting``."""

    setting: str
    name: str
    device_type: str
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (``torch.bfloat16``), or ``None`` for plain float32."""
        return torch.bfloat16 if self.name == "bf16" else None

    def autocast(self) -> ContextManager[Any]:
        """The context to run a forward pass in: bf16 autocast, or nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    @contextlib.contextmanager
    def attention(self, model: Any) -> Iterator[None]:
        """For the duration of a run: under bf16 on a CPU, ``model``'s SDPA attention takes float32 queries,
        keys and values (``model``: a transformers model, or a PEFT model around one); else nothing changes.

        The switch is transformers' own (:meth:`~transformers.PreTrainedModel.set_attn_implementation` to an
        implementation registered under :data:`FP32_SDPA`, with the SDPA mask) and is undone on exit.
        """
        lm = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
        config = getattr(lm, "config", None)
        if self.dtype is None or self.device_type != "cpu" or getattr(config, "_attn_implementation", None) != "sdpa":
            yield
            return
        _register_fp32_sdpa()
        lm.set_attn_implementation(FP32_SDPA)
        try:
            yield
        finally:
            lm.set_attn_implementation("sdpa")

    def to_dict(self) -> dict[str, str]:
        return {"setting": self.setting, "used": self.name, "device": self.device_type, "reason": self.reason}


#: The name under which transformers finds SDPA attention in float32 (:meth:`ResolvedPrecision.attention`).
FP32_SDPA = "lorablocks_sdpa_fp32"


def _fp32_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
               **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """transformers' SDPA attention on float32 inputs, outside autocast; the output in the queries' dtype."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    with torch.autocast(device_type=query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(dtype), weights


@functools.lru_cache(maxsize=1)
def _register_fp32_sdpa() -> None:
    """Register :data:`FP32_SDPA` with transformers (attention and mask interfaces), once per process."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FP32_SDPA, _fp32_sdpa)
    AttentionMaskInterface.register(FP32_SDPA, sdpa_mask)


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``); empty where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def _torch_cpu_bf16() -> bool:
    """torch's own checks of the running CPU (private helpers; absent in some versions)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def native_bf16(device_type: str) -> tuple[bool, str]:
    """Whether ``device_type`` (``cpu``, ``cuda``, ...) computes bf16 natively, and what says so."""
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        try:
            ok = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.3 has no emulation flag
            ok = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name()
        return ok, f"{name} {'supports' if ok else 'does not support'} bf16 natively"
    if device_type == "cpu":
        flags = sorted(_CPU_BF16_FLAGS & _cpu_flags())
        if flags:
            return True, f"CPU flags {', '.join(flags)}"
        if not _cpu_flags() and _torch_cpu_bf16():
            return True, "torch reports AVX-512 BF16 or AMX on this CPU"
        return False, "the CPU has neither avx512_bf16 nor amx_bf16"
    return False, f"no native-bf16 check for device type {device_type!r}"


def resolve_precision(setting: str, device: torch.device | str = "cpu") -> ResolvedPrecision:
    """The one decision of what a run computes in (see the module docstring).

    An explicit ``bf16`` where the device lacks native support logs one warning line and uses float32;
    ``auto`` picks float32 there silently. Any other ``setting`` is a ``ValueError`` (the configs validate it).
    """
    if setting not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {setting!r}")
    device_type = torch.device(device).type
    if setting == "fp32":
        return ResolvedPrecision(setting, "fp32", device_type, "fp32 requested")
    ok, why = native_bf16(device_type)
    if ok:
        return ResolvedPrecision(setting, "bf16", device_type, f"native bf16 on {device_type}: {why}")
    if setting == "bf16":
        reason = f"bf16 requested but {device_type} has no native bf16 ({why}); using fp32"
        log.warning(reason)
        return ResolvedPrecision(setting, "fp32", device_type, reason)
    return ResolvedPrecision(setting, "fp32", device_type, f"no native bf16 on {device_type} ({why})")
