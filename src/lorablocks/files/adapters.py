"""PEFT LoRA adapter files: read them into factored deltas, write factored deltas back.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. Reading folds each
module's scale (``alpha/r``, ``alpha/sqrt(r)`` with rsLoRA, ``rank_pattern``/``alpha_pattern`` per module)
into its ``A`` factor. Writing stores every module with ``lora_alpha == r`` (scale 1), per-module ranks in
``rank_pattern``/``alpha_pattern`` and the exact module names in ``target_modules``, so that PEFT's
``PeftModel.from_pretrained`` reproduces the delta exactly.

What a sum of deltas cannot represent exactly is refused: DoRA, LoRA biases, extra trained modules
(``modules_to_save``), embedding LoRA, and pickled ``.bin`` weights (unsafe to load). Factors stored as
float64/32/16 or bfloat16 are read as they are, float8 ones upcast exactly; any other dtype is refused.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors import safe_open

from lorablocks.core.algebra import Delta, LowRank, check_finite, from_peft_factors, lora_scale
from lorablocks.errors import AdapterFormatError, NonFiniteError, UnsupportedAdapterError
from lorablocks.files.outputs import note_input, one_line, sha256_file

__all__ = ["Adapter", "AdapterFile", "open_adapter", "load_adapter", "CONFIG_NAME", "WEIGHTS_NAME", "RECORD_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: Provenance written beside every adapter lorablocks makes.
RECORD_NAME = "lorablocks.json"

#: PEFT's LoraConfig default rank, which applies when a config has no ``r``.
_PEFT_DEFAULT_R = 8

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")


class _Described:
    """What an adapter's config and origin say, shared by loaded and opened adapters."""

    config: dict[str, Any]
    path: Path | None
    sha256: str | None
    module_scales: dict[str, tuple[int, float, float]]

    @property
    def scales_sha256(self) -> str:
        """sha256 of what the config adds to the weights file: every module's effective ``(r, alpha, scale)``
        (``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, rsLoRA) and ``fan_in_fan_out``."""
        scales = sorted([m, r, float(a), float(s)] for m, (r, a, s) in self.module_scales.items())
        key = json.dumps({"scales": scales, "fan_in_fan_out": self.fan_in_fan_out})
        return hashlib.sha256(key.encode()).hexdigest()

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


def _check_folder(path: Path) -> None:
    """Raise a one-line AdapterFormatError unless ``path`` is a folder that can be read."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise AdapterFormatError(f"{path} is a broken symbolic link" if os.path.islink(path)
                                 else f"{path} does not exist") from None
    except OSError as exc:
        raise AdapterFormatError(_unreadable(path, exc)) from None
    if not stat.S_ISDIR(mode):
        raise AdapterFormatError(f"{path} is not a folder; an adapter is a folder with {CONFIG_NAME} and {WEIGHTS_NAME}")


def _stat_file(path: Path, missing: str) -> None:
    """Raise a one-line AdapterFormatError unless ``path`` is a readable regular file; ``missing`` is the
    message when it does not exist."""
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISREG(mode):
            with open(path, "rb"):
                return
    except FileNotFoundError:
        raise AdapterFormatError(f"{path} is a broken symbolic link" if os.path.islink(path) else missing) from None
    except OSError as exc:
        raise AdapterFormatError(_unreadable(path, exc)) from None
    raise AdapterFormatError(f"{path} is not a regular file")


def _unreadable(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return f"{path} is a symbolic link loop"
    return f"{path} cannot be read: {exc.strerror or one_line(exc)}"


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / CONFIG_NAME
    _stat_file(cfg_path, f"{path} is not a LoRA adapter: it has no {CONFIG_NAME}")
    try:
        config = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise AdapterFormatError(_unreadable(cfg_path, exc)) from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise AdapterFormatError(f"{cfg_path} is not valid JSON ({one_line(exc)})") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{cfg_path} does not hold a JSON object")
    return config


def _rank(value: Any, what: str, where: Path) -> int:
    """A LoRA rank from a config: a whole number >= 1 (``4.0`` is 4)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value != int(value) or value < 1:
        raise AdapterFormatError(f"{where}: {what} must be a whole number >= 1, got {value!r}")
    return int(value)


def _alpha(value: Any, what: str, where: Path) -> float:
    """A LoRA alpha from a config: a finite number."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise AdapterFormatError(f"{where}: {what} must be a finite number, got {value!r}")
    return float(value)


def _pattern(config: Mapping[str, Any], key: str, where: Path, parse: Any) -> dict[str, Any]:
    """``rank_pattern``/``alpha_pattern``: a JSON object from module-name patterns to values."""
    pattern = config.get(key)
    if pattern is None or pattern == {}:
        return {}
    if not isinstance(pattern, dict):
        raise AdapterFormatError(f"{where}: {key} must be a JSON object from module names to values, "
                                 f"got {type(pattern).__name__}")
    return {k: parse(v, f"{key}[{k!r}]", where) for k, v in pattern.items()}


def _check_supported(config: dict[str, Any], where: Path) -> None:
    for key in ("use_dora", "use_rslora", "fan_in_fan_out", "lora_bias"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise AdapterFormatError(f"{where}: {key} must be true or false, got {config[key]!r}")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise AdapterFormatError(f"{where}: base_model_name_or_path must be a string, got {base!r}")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnsupportedAdapterError(f"{where}: peft_type {peft_type} is not LoRA")
    if config.get("use_dora"):
        raise UnsupportedAdapterError(
            f"{where}: DoRA adapters rescale the weight by a learned magnitude; their sum is not a sum of deltas"
        )
    if config.get("bias", "none") not in ("none", None) or config.get("lora_bias"):
        raise UnsupportedAdapterError(f"{where}: the adapter trains biases, which lorablocks cannot combine exactly")
    extra = config.get("modules_to_save")
    if extra:
        names = ", ".join(map(str, extra)) if isinstance(extra, (list, tuple)) else str(extra)
        raise UnsupportedAdapterError(
            f"{where}: the adapter also trains full modules ({names}); only LoRA factors can be combined exactly"
        )


@dataclass(frozen=True)
class _Scaling:
    """What a config says about ranks and scales, validated."""

    r: int | None  # None: the config has no r (PEFT's default 8 applies)
    alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    @classmethod
    def of(cls, config: Mapping[str, Any], where: Path) -> "_Scaling":
        r = _rank(config["r"], "r", where) if config.get("r") is not None else None
        alpha = config.get("lora_alpha")
        alpha = float(r or _PEFT_DEFAULT_R) if alpha is None else _alpha(alpha, "lora_alpha", where)
        return cls(r, alpha, bool(config.get("use_rslora", False)), _pattern(config, "rank_pattern", where, _rank),
                   _pattern(config, "alpha_pattern", where, _alpha))

    def module(self, module: str, stored: int, where: Path) -> tuple[int, float, float]:
        """``(r_m, alpha_m, scale_m)`` of ``module`` whose weights have rank ``stored``."""
        r = _pattern_value(self.rank_pattern, module, self.r)
        if r is None:
            if stored != _PEFT_DEFAULT_R:
                raise AdapterFormatError(
                    f"{where}: {CONFIG_NAME} has no r (PEFT then assumes {_PEFT_DEFAULT_R}), but module {module} "
                    f"has rank {stored} in its weights"
                )
            r = _PEFT_DEFAULT_R
        if r != stored:
            raise AdapterFormatError(f"{where}: module {module} has rank {stored} in its weights but {r} in {CONFIG_NAME}")
        alpha = float(_pattern_value(self.alpha_pattern, module, self.alpha))
        return r, alpha, lora_scale(r, alpha, self.use_rslora)


#: safetensors dtypes read as stored, and those upcast exactly to float32 when read (every float8 value is a float32).
_READ_AS_IS = frozenset({"F64", "F32", "F16", "BF16"})
_UPCAST = frozenset({"F8_E4M3", "F8_E5M2"})


def _read_header(weights: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the safetensors header (no data read); refuses dtypes lorablocks cannot
    read exactly (integers, booleans, exotic float formats)."""
    try:
        with safe_open(str(weights), framework="pt") as fh:
            slices = {key: fh.get_slice(key) for key in fh.keys()}
            header = {key: tuple(sl.get_shape()) for key, sl in slices.items()}
            dtypes = {key: str(sl.get_dtype()) for key, sl in slices.items()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError) as exc:
        raise AdapterFormatError(f"{weights} is corrupt or truncated ({one_line(exc)})") from None
    for key, dtype in sorted(dtypes.items()):
        if dtype not in _READ_AS_IS | _UPCAST:
            raise UnsupportedAdapterError(
                f"{weights}: tensor {key} is stored as {dtype}; lorablocks reads F64, F32, F16, BF16 and "
                f"F8_E4M3/F8_E5M2 (upcast exactly) factors")
    return header


def _factor_keys(header: Mapping[str, tuple[int, ...]], path: Path) -> dict[str, dict[str, str]]:
    """module -> {"A": key, "B": key}; refuses tensors that are not Linear LoRA factors."""
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
        raise AdapterFormatError(f"{path / WEIGHTS_NAME} holds no LoRA factors")
    return keys


def _readable(t: torch.Tensor) -> torch.Tensor:
    """A factor in a dtype torch computes with: float8 upcast to float32 (exact), others as they are."""
    return t.float() if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


class AdapterFile(_Described):
    """An adapter folder opened and validated from its config and safetensors header, weights not yet read.

    ``factors(module)`` reads one module's two tensors on demand, so that file-level operations can work
    one module at a time and hold no more than the output in memory.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        _check_folder(path)
        config = _read_config(path)
        _check_supported(config, path)
        scaling = _Scaling.of(config, path)
        weights = path / WEIGHTS_NAME
        if not os.path.lexists(weights) and os.path.lexists(path / "adapter_model.bin"):
            raise UnsupportedAdapterError(
                f"{path} stores its weights as pickled adapter_model.bin, which can run arbitrary code when "
                f"loaded; convert it to {WEIGHTS_NAME} with a tool you trust"
            )
        _stat_file(weights, f"{path} has no {WEIGHTS_NAME}")
        self.path, self.config, self.weights = path, config, weights
        header = _read_header(weights)
        #: module -> (lora_A key, lora_B key)
        self.keys: dict[str, tuple[str, str]] = {}
        #: module -> (out, in) of its dense delta
        self.shapes: dict[str, tuple[int, int]] = {}
        #: module -> (rank r_m, alpha_m, scale s_m) as the config says
        self.module_scales: dict[str, tuple[int, float, float]] = {}
        for module, pair in sorted(_factor_keys(header, path).items()):
            if set(pair) != {"A", "B"}:
                missing = ({"A", "B"} - set(pair)).pop()
                raise AdapterFormatError(f"{path}: module {module} has no lora_{missing} factor")
            a_shape, b_shape = header[pair["A"]], header[pair["B"]]
            if a_shape[0] != b_shape[1]:
                raise AdapterFormatError(
                    f"{path}: module {module} has lora_A {a_shape} and lora_B {b_shape}, which do not chain"
                )
            self.keys[module] = (pair["A"], pair["B"])
            self.shapes[module] = (b_shape[0], a_shape[1])
            self.module_scales[module] = scaling.module(module, a_shape[0], path)
        try:
            self.sha256 = sha256_file(weights)
        except OSError as exc:
            raise AdapterFormatError(_unreadable(weights, exc)) from None
        note_input(path)  # an input of the running command: no output of it may replace it or lie inside it

    @property
    def modules(self) -> list[str]:
        return list(self.keys)

    @property
    def statistics(self) -> Any:
        """The input statistics stored beside the adapter (``lorablocks_stats.safetensors``), or None;
        opened (header only) on first use."""
        if not hasattr(self, "_statistics"):
            from lorablocks.files.statistics import statistics_beside

            self._statistics = statistics_beside(self.path)
        return self._statistics

    def _read(self, fh: Any, module: str, dtype: torch.dtype) -> LowRank:
        key_a, key_b = self.keys[module]
        try:
            a, b = (_readable(fh.get_tensor(k)) for k in (key_a, key_b))
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
            raise AdapterFormatError(f"{self.weights}: cannot read module {module} ({one_line(exc)})") from None
        r, alpha, s = self.module_scales[module]
        check_finite({module: LowRank(B=b, A=a)}, label=str(self.path))  # blames the factor at fault
        x = from_peft_factors(a, b, s, dtype=dtype)
        for which, t in (("A", x.A), ("B", x.B)):
            if not torch.isfinite(t).all():
                what = f"lora_A times its scale alpha/r = {alpha:g}/{r}" if which == "A" else "lora_B"
                raise NonFiniteError(f"{self.path}: module {module}: {what} overflows {str(dtype).replace('torch.', '')}")
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
