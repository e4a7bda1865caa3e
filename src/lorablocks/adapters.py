"""PEFT LoRA adapter files: read them into factored deltas, write factored deltas back.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. Reading folds each
module's scale (``alpha/r``, ``alpha/sqrt(r)`` with rsLoRA, ``rank_pattern``/``alpha_pattern`` per module)
into its ``A`` factor. Writing stores every module with ``lora_alpha == r`` (scale 1), per-module ranks in
``rank_pattern``/``alpha_pattern`` and the exact module names in ``target_modules``, so that PEFT's
``PeftModel.from_pretrained`` reproduces the delta exactly.

What a sum of deltas cannot represent exactly is refused: DoRA, LoRA biases, extra trained modules
(``modules_to_save``), embedding LoRA, and pickled ``.bin`` weights (unsafe to load).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorablocks.algebra import Delta, LowRank, check_finite, from_peft_factors, lora_scale
from lorablocks.errors import AdapterFormatError, UnsupportedAdapterError
from lorablocks.io import atomic_dir, sha256_file, utc_now, versions

__all__ = ["Adapter", "load_adapter", "save_adapter", "CONFIG_NAME", "WEIGHTS_NAME", "RECORD_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: Provenance written beside every adapter lorablocks makes.
RECORD_NAME = "lorablocks.json"

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")


@dataclass
class Adapter:
    """A loaded adapter: its delta (scale folded in), its PEFT config and where it came from."""

    delta: Delta
    config: dict[str, Any]
    path: Path | None = None
    sha256: str | None = None
    #: per module: (stored rank r_m, alpha_m, scale s_m) as read from the config
    module_scales: dict[str, tuple[int, float, float]] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else "adapter"

    def provenance(self) -> dict[str, Any]:
        return {"path": str(self.path) if self.path else None, "sha256": self.sha256, "base_model": self.base_model}


def _pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: a key matches a module name equal to it or ending in ``.key`` (keys may be regexes)."""
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return value
        try:
            if re.fullmatch(rf"(.*\.)?({key})", module):
                return value
        except re.error:
            continue
    return default


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterFormatError(f"{path} is not a LoRA adapter: it has no {CONFIG_NAME}")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{cfg_path} is not valid JSON ({exc})")
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{cfg_path} does not hold a JSON object")
    return config


def _check_supported(config: dict[str, Any], where: Path) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnsupportedAdapterError(f"{where}: peft_type {peft_type} is not LoRA")
    if config.get("use_dora"):
        raise UnsupportedAdapterError(
            f"{where}: DoRA adapters rescale the weight by a learned magnitude; their sum is not a sum of deltas"
        )
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise UnsupportedAdapterError(f"{where}: the adapter trains biases, which lorablocks cannot combine exactly")
    if config.get("modules_to_save"):
        raise UnsupportedAdapterError(
            f"{where}: the adapter also trains full modules ({', '.join(map(str, config['modules_to_save']))}); "
            "only LoRA factors can be combined exactly"
        )
    for key in ("r", "lora_alpha"):
        if key in config and not isinstance(config[key], (int, float)):
            raise AdapterFormatError(f"{where}: {key} must be a number, got {config[key]!r}")


def load_adapter(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Adapter:
    """Read a PEFT LoRA adapter folder into a factored delta (float32 or wider)."""
    path = Path(path)
    if not path.exists():
        raise AdapterFormatError(f"{path} does not exist")
    if not path.is_dir():
        raise AdapterFormatError(f"{path} is not a folder; an adapter is a folder with {CONFIG_NAME} and {WEIGHTS_NAME}")
    config = _read_config(path)
    _check_supported(config, path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        if (path / "adapter_model.bin").exists():
            raise UnsupportedAdapterError(
                f"{path} stores its weights as pickled adapter_model.bin, which can run arbitrary code when "
                f"loaded; convert it to {WEIGHTS_NAME} with a tool you trust"
            )
        raise AdapterFormatError(f"{path} has no {WEIGHTS_NAME}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFormatError(f"{weights} is corrupt or truncated ({str(exc).splitlines()[0]})")

    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", r_default))
    use_rslora = bool(config.get("use_rslora", False))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}

    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if "lora_magnitude_vector" in key:
            raise UnsupportedAdapterError(f"{path}: tensor {key} is a DoRA magnitude; DoRA cannot be summed exactly")
        if "lora_embedding_" in key:
            raise UnsupportedAdapterError(f"{path}: tensor {key} is an embedding LoRA, which lorablocks does not support")
        m = _KEY.match(key)
        if m is None:
            raise UnsupportedAdapterError(
                f"{path}: tensor {key} is not a LoRA factor (biases and extra trained modules cannot be combined)"
            )
        if tensor.ndim != 2:
            raise UnsupportedAdapterError(f"{path}: tensor {key} has {tensor.ndim} dimensions; only Linear LoRA is supported")
        factors.setdefault(m["module"], {})[m["which"]] = tensor
    if not factors:
        raise AdapterFormatError(f"{weights} holds no LoRA factors")

    delta: Delta = {}
    scales: dict[str, tuple[int, float, float]] = {}
    for module in sorted(factors):
        pair = factors[module]
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise AdapterFormatError(f"{path}: module {module} has no lora_{missing} factor")
        A, B = pair["A"], pair["B"]
        if A.shape[0] != B.shape[1]:
            raise AdapterFormatError(
                f"{path}: module {module} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, which do not chain"
            )
        r = int(_pattern_value(rank_pattern, module, r_default))
        alpha = float(_pattern_value(alpha_pattern, module, alpha_default))
        if r != A.shape[0]:
            raise AdapterFormatError(
                f"{path}: module {module} has rank {A.shape[0]} in its weights but {r} in {CONFIG_NAME}"
            )
        s = lora_scale(r, alpha, use_rslora)
        delta[module] = from_peft_factors(A, B, s, dtype=dtype)
        scales[module] = (r, alpha, s)
    check_finite(delta, label=str(path))
    return Adapter(delta=delta, config=config, path=path, sha256=sha256_file(weights), module_scales=scales)


def save_adapter(
    delta: Mapping[str, LowRank],
    out: str | os.PathLike,
    *,
    base_model: str | None,
    fan_in_fan_out: bool = False,
    task_type: str | None = "CAUSAL_LM",
    record: dict[str, Any] | None = None,
    force: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``delta`` as a PEFT LoRA adapter folder, atomically, with a provenance record beside it.

    Each module is stored with scale 1 (``alpha_m = r_m``); the most common rank is ``r`` and the others go
    in ``rank_pattern``/``alpha_pattern`` keyed by full module name. Zero-rank modules are left out.
    """
    modules = {name: x for name, x in delta.items() if x.rank > 0}
    if not modules:
        raise UnsupportedAdapterError("the result is exactly zero in every module; there is no adapter to write")
    check_finite(modules, label="result")
    ranks = {name: x.rank for name, x in modules.items()}
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r_main = max(counts, key=lambda r: (counts[r], r))
    # Full module names: PEFT matches a key against ``(.*\.)?key$``, so a full name reaches only its module.
    rank_pattern = {n: r for n, r in ranks.items() if r != r_main}
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": r_main,
        "lora_alpha": r_main,
        "use_rslora": False,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "target_modules": sorted(modules),
        "fan_in_fan_out": bool(fan_in_fan_out),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    tensors = {}
    for name, x in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = x.A.to(dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = x.B.to(dtype).contiguous()
    rec = {"tool": "lorablocks", "created": utc_now(), "versions": versions(), **(record or {})}
    with atomic_dir(out, force=force) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / RECORD_NAME).write_text(json.dumps(rec, indent=2, default=str) + "\n")
    return Path(out)
