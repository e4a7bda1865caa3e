"""Writing factored deltas as PEFT LoRA adapter folders, one module at a time, atomically.

Each module is stored with scale 1 (``lora_alpha == r``), per-module ranks in ``rank_pattern``/``alpha_pattern``
keyed by full module name and the exact module names in ``target_modules``, so that PEFT's
``PeftModel.from_pretrained`` reproduces the delta exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lorablocks.core.algebra import LowRank, check_finite
from lorablocks.errors import UnsupportedAdapterError
from lorablocks.files.adapters import CONFIG_NAME, RECORD_NAME, WEIGHTS_NAME
from lorablocks.files.outputs import atomic_dir, interrupt_noted, utc_now, versions

__all__ = ["AdapterWriter", "save_adapter"]


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
                 task_type: str | None = "CAUSAL_LM", force: bool = False, dtype: torch.dtype = torch.float32,
                 inputs: Sequence[str | os.PathLike] = ()) -> None:
        self.out, self.force, self.dtype, self.inputs = Path(out), force, dtype, list(inputs)
        self.base_model, self.fan_in_fan_out, self.task_type = base_model, fan_in_fan_out, task_type
        self.record: dict[str, Any] = {}
        self._ranks: dict[str, int] = {}
        self._header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self._offset = 0
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "AdapterWriter":
        self._tmp = self._stack.enter_context(atomic_dir(self.out, force=self.force, kind="adapter", inputs=self.inputs))
        self._data = self._stack.enter_context(open(self._tmp / ".data", "wb"))
        return self

    def add(self, name: str, x: LowRank) -> None:
        """Append one module (a zero-rank module is left out: it contributes nothing)."""
        if interrupt_noted():  # Ctrl-C was pressed and the KeyboardInterrupt swallowed: stop here
            raise KeyboardInterrupt
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
        rec = {"tool": "lorablocks", "kind": "adapter", "created": utc_now(), "versions": versions(), **self.record}
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
    inputs: Sequence[str | os.PathLike] = (),
) -> Path:
    """Write ``delta`` as a PEFT LoRA adapter folder, atomically, with a provenance record beside it.

    Each module is stored with scale 1 (``alpha_m = r_m``); the most common rank is ``r`` and the others go
    in ``rank_pattern``/``alpha_pattern`` keyed by full module name. Zero-rank modules are left out.
    With ``force`` only a previous lorablocks adapter is replaced, never a folder holding ``inputs``.
    """
    with AdapterWriter(out, base_model=base_model, fan_in_fan_out=fan_in_fan_out, task_type=task_type,
                       force=force, dtype=dtype, inputs=inputs) as writer:
        for name, x in delta.items():
            writer.add(name, x)
        writer.record = dict(record or {})
    return Path(out)
