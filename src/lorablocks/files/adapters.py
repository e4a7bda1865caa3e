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

import contextlib
import json
import os
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors import safe_open

from lorablocks.core.algebra import Delta, LowRank, check_finite, from_peft_factors, lora_scale
from lorablocks.errors import AdapterFormatError, UnsupportedAdapterError
from lorablocks.files.outputs import atomic_dir, sha256_file, utc_now, versions

__all__ = ["Adapter", "AdapterFile", "AdapterWriter", "open_adapter", "load_adapter", "save_adapter", "CONFIG_NAME", "WEIGHTS_NAME", "RECORD_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: Provenance written beside every adapter lorablocks makes.
RECORD_NAME = "lorablocks.json"

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")


class _Described:
    """What an adapter's config and origin say, shared by loaded and opened adapters."""

    config: dict[str, Any]
    path: Path | None
    sha256: str | None

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


@dataclass
class Adapter(_Described):
    """A loaded adapter: its delta (scale folded in), its PEFT config and where it came from."""

    delta: Delta
    config: dict[str, Any]
    path: Path | None = None
    sha256: str | None = None
    #: per module: (stored rank r_m, alpha_m, scale s_m) as read from the config
    module_scales: dict[str, tuple[int, float, float]] = field(default_factory=dict)


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


class AdapterFile(_Described):
    """An adapter folder opened and validated from its config and safetensors header, weights not yet read.

    ``factors(module)`` reads one module's two tensors on demand, so that file-level operations can work
    one module at a time and hold no more than the output in memory.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if not path.exists():
            raise AdapterFormatError(f"{path} does not exist")
        if not path.is_dir():
            raise AdapterFormatError(
                f"{path} is not a folder; an adapter is a folder with {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
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
        self.path, self.config, self.weights = path, config, weights
        try:
            with safe_open(str(weights), framework="pt") as fh:
                header = {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise AdapterFormatError(f"{weights} is corrupt or truncated ({str(exc).splitlines()[0]})")

        keys: dict[str, dict[str, str]] = {}
        for key, shape in header.items():
            if "lora_magnitude_vector" in key:
                raise UnsupportedAdapterError(f"{path}: tensor {key} is a DoRA magnitude; DoRA cannot be summed exactly")
            if "lora_embedding_" in key:
                raise UnsupportedAdapterError(f"{path}: tensor {key} is an embedding LoRA, which lorablocks does not support")
            m = _KEY.match(key)
            if m is None:
                raise UnsupportedAdapterError(
                    f"{path}: tensor {key} is not a LoRA factor (biases and extra trained modules cannot be combined)"
                )
            if len(shape) != 2:
                raise UnsupportedAdapterError(f"{path}: tensor {key} has {len(shape)} dimensions; only Linear LoRA is supported")
            keys.setdefault(m["module"], {})[m["which"]] = key
        if not keys:
            raise AdapterFormatError(f"{weights} holds no LoRA factors")

        r_default = int(config.get("r", 8))
        alpha_default = float(config.get("lora_alpha", r_default))
        use_rslora = bool(config.get("use_rslora", False))
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        #: module -> (lora_A key, lora_B key)
        self.keys: dict[str, tuple[str, str]] = {}
        #: module -> (out, in) of its dense delta
        self.shapes: dict[str, tuple[int, int]] = {}
        #: module -> (rank r_m, alpha_m, scale s_m) as the config says
        self.module_scales: dict[str, tuple[int, float, float]] = {}
        for module in sorted(keys):
            pair = keys[module]
            if set(pair) != {"A", "B"}:
                missing = ({"A", "B"} - set(pair)).pop()
                raise AdapterFormatError(f"{path}: module {module} has no lora_{missing} factor")
            a_shape, b_shape = header[pair["A"]], header[pair["B"]]
            if a_shape[0] != b_shape[1]:
                raise AdapterFormatError(
                    f"{path}: module {module} has lora_A {a_shape} and lora_B {b_shape}, which do not chain"
                )
            r = int(_pattern_value(rank_pattern, module, r_default))
            alpha = float(_pattern_value(alpha_pattern, module, alpha_default))
            if r != a_shape[0]:
                raise AdapterFormatError(
                    f"{path}: module {module} has rank {a_shape[0]} in its weights but {r} in {CONFIG_NAME}"
                )
            self.keys[module] = (pair["A"], pair["B"])
            self.shapes[module] = (b_shape[0], a_shape[1])
            self.module_scales[module] = (r, alpha, lora_scale(r, alpha, use_rslora))
        self.sha256 = sha256_file(weights)

    @property
    def modules(self) -> list[str]:
        return list(self.keys)

    def _read(self, fh: Any, module: str, dtype: torch.dtype) -> LowRank:
        key_a, key_b = self.keys[module]
        x = from_peft_factors(fh.get_tensor(key_a), fh.get_tensor(key_b), self.module_scales[module][2], dtype=dtype)
        check_finite({module: x}, label=str(self.path))
        return x

    def factors(self, module: str, dtype: torch.dtype = torch.float32) -> LowRank:
        """One module's factored delta (scale folded in), read from disk now."""
        with safe_open(str(self.weights), framework="pt") as fh:
            return self._read(fh, module, dtype)

    def load(self, dtype: torch.dtype = torch.float32) -> Adapter:
        """Every module, read in one pass."""
        with safe_open(str(self.weights), framework="pt") as fh:
            delta = {m: self._read(fh, m, dtype) for m in self.keys}
        return Adapter(delta=delta, config=self.config, path=self.path, sha256=self.sha256,
                       module_scales=dict(self.module_scales))


def open_adapter(path: str | os.PathLike) -> AdapterFile:
    """Open and validate a PEFT LoRA adapter folder without reading its weights."""
    return AdapterFile(path)


def load_adapter(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Adapter:
    """Read a PEFT LoRA adapter folder into a factored delta (float32 or wider)."""
    return AdapterFile(path).load(dtype)


_ST_DTYPES = {torch.float32: ("F32", 4), torch.float16: ("F16", 2), torch.bfloat16: ("BF16", 2), torch.float64: ("F64", 8)}


def _peft_config(ranks: Mapping[str, int], base_model: str | None, fan_in_fan_out: bool, task_type: str | None) -> dict:
    """A PEFT LoRA config storing every module at scale 1 (``alpha_m = r_m``), per-module ranks by full name."""
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r_main = max(counts, key=lambda r: (counts[r], r))
    # Full module names: PEFT matches a key against ``(.*\.)?key$``, so a full name reaches only its module.
    rank_pattern = {n: r for n, r in ranks.items() if r != r_main}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": r_main,
        "lora_alpha": r_main,
        "use_rslora": False,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "target_modules": sorted(ranks),
        "fan_in_fan_out": bool(fan_in_fan_out),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


class AdapterWriter:
    """Write a PEFT LoRA adapter one module at a time, atomically, holding no module after it is added.

    Each :meth:`add` appends the module's raw factors to a scratch file; on a clean exit the safetensors
    file is assembled (header, then the scratch data streamed through a small buffer), the config and the
    provenance record (:attr:`record`) are written and the folder is renamed into place. On an error the
    temporary folder is removed and nothing appears at ``out``.

    The safetensors layout is the library's: a little-endian u64 header size, a JSON header padded with
    spaces to a multiple of 8 bytes, then the tensors' bytes at the header's ``data_offsets``.
    """

    def __init__(self, out: str | os.PathLike, *, base_model: str | None, fan_in_fan_out: bool = False,
                 task_type: str | None = "CAUSAL_LM", force: bool = False, dtype: torch.dtype = torch.float32) -> None:
        self.out, self.force, self.dtype = Path(out), force, dtype
        self.base_model, self.fan_in_fan_out, self.task_type = base_model, fan_in_fan_out, task_type
        self.record: dict[str, Any] = {}
        self._ranks: dict[str, int] = {}
        self._header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self._offset = 0
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "AdapterWriter":
        self._tmp = self._stack.enter_context(atomic_dir(self.out, force=self.force))
        self._data = self._stack.enter_context(open(self._tmp / ".data", "wb"))
        return self

    def add(self, name: str, x: LowRank) -> None:
        """Append one module (a zero-rank module is left out: it contributes nothing)."""
        if x.rank == 0:
            return
        check_finite({name: x}, label="result")
        code, size = _ST_DTYPES[self.dtype]
        for which, t in (("A", x.A), ("B", x.B)):
            data = t.detach().to("cpu", self.dtype).contiguous()
            n = data.numel() * size
            key = f"base_model.model.{name}.lora_{which}.weight"
            self._header[key] = {"dtype": code, "shape": list(data.shape), "data_offsets": [self._offset, self._offset + n]}
            self._offset += n
            if self.dtype == torch.bfloat16:
                data = data.view(torch.int16)
            self._data.write(memoryview(data.numpy()).cast("B"))
        self._ranks[name] = x.rank

    def _finish(self) -> None:
        self._data.close()
        if not self._ranks:
            raise UnsupportedAdapterError("the result is exactly zero in every module; there is no adapter to write")
        blob = json.dumps(self._header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(self._tmp / WEIGHTS_NAME, "wb") as fh, open(self._tmp / ".data", "rb") as data:
            fh.write(len(blob).to_bytes(8, "little"))
            fh.write(blob)
            shutil.copyfileobj(data, fh, 1 << 20)
        (self._tmp / ".data").unlink()
        config = _peft_config(self._ranks, self.base_model, self.fan_in_fan_out, self.task_type)
        (self._tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        rec = {"tool": "lorablocks", "created": utc_now(), "versions": versions(), **self.record}
        (self._tmp / RECORD_NAME).write_text(json.dumps(rec, indent=2, default=str) + "\n")

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._finish()
        except BaseException:
            self._stack.__exit__(*sys.exc_info())
            raise
        return bool(self._stack.__exit__(exc_type, exc, tb))


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
    with AdapterWriter(out, base_model=base_model, fan_in_fan_out=fan_in_fan_out, task_type=task_type,
                       force=force, dtype=dtype) as writer:
        for name, x in delta.items():
            writer.add(name, x)
        writer.record = dict(record or {})
    return Path(out)
