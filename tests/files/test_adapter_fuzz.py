"""Fuzzing the adapter reader: random byte and field corruption of ``adapter_config.json`` and of the
safetensors header of a small adapter. Every case either loads or raises a ``LoraBlocksError`` with one
non-empty line; never another exception (which the CLI would show as an internal error)."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

from lorablocks.core.algebra import LowRank
from lorablocks.errors import LoraBlocksError
from lorablocks.files.adapters import CONFIG_NAME, WEIGHTS_NAME, load_adapter
from lorablocks.files.writer import save_adapter

CASES = 150  # per corruption family; 600 in all, about a second

#: JSON values that configs and headers must survive in any field.
VALUES = [None, True, False, 0, -1, 1, 2, 3, 4.5, 1e308, -0.0, math.nan, math.inf, -math.inf, 2**70, "", "x",
          "nan", [], [1], [2, 3], {}, {"q_proj": "a"}, {"q_proj": [1]}, {"q_proj": 2.5}, {"q_proj": -1},
          {"q_proj": 0}, {".*": 0}, {"(": 1}, {"q_proj": None}, {"q_proj": {"a": 1}}, {"q_proj": math.nan},
          {"q_proj": True}]
CONFIG_KEYS = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "peft_type", "bias",
               "modules_to_save", "use_dora", "fan_in_fan_out", "target_modules", "base_model_name_or_path",
               "lora_bias", "task_type"]
DTYPES = ["F32", "F16", "BF16", "F64", "I32", "I64", "I8", "U8", "BOOL", "F8_E4M3", "XX", 1, None]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """Two modules of ranks 2 and 3 (so ``rank_pattern`` is used), random non-zero factors."""
    g = torch.Generator().manual_seed(0)
    delta = {
        "model.layers.0.self_attn.q_proj": LowRank(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)),
        "model.layers.0.self_attn.v_proj": LowRank(torch.randn(4, 3, generator=g), torch.randn(3, 5, generator=g)),
    }
    path = save_adapter(delta, tmp_path_factory.mktemp("fuzz") / "a", base_model="toy")
    assert load_adapter(path).delta  # the pristine adapter loads
    return path


def _check(path: Path) -> str:
    """Load ``path``; return "ok" or "refused"; fail on anything but a one-line LoraBlocksError."""
    try:
        load_adapter(path)
    except LoraBlocksError as exc:
        msg = str(exc)
        assert msg.strip() and "\n" not in msg, repr(msg)
        return "refused"
    return "ok"


def _case(adapter: Path, tmp_path: Path, i: int) -> Path:
    path = tmp_path / f"c{i}"
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(adapter, path)
    return path


def _flip(rng: random.Random, data: bytes, lo: int = 0, hi: int | None = None) -> bytes:
    """Flip, insert, delete bytes in ``data[lo:hi]`` or truncate it."""
    buf = bytearray(data)
    hi = len(buf) if hi is None else hi
    op = rng.choice(["flip", "insert", "delete", "truncate", "set"])
    pos = rng.randrange(lo, max(lo + 1, hi))
    if op == "truncate":
        return bytes(buf[:pos])
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(lo, max(lo + 1, min(hi, len(buf))))
        if op == "flip" and pos < len(buf):
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == "insert":
            buf.insert(pos, rng.randrange(256))
        elif op == "delete" and pos < len(buf):
            del buf[pos]
        elif op == "set" and pos < len(buf):
            buf[pos] = rng.choice(b'{}[]",:0-9eE.\x00\xff ')
    return bytes(buf)


def _split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return len(blob).to_bytes(8, "little") + blob + body


def _mutate_header(rng: random.Random, header: dict) -> None:
    keys = [k for k in header if k != "__metadata__"]
    key = rng.choice(keys)
    entry = header[key]
    op = rng.choice(["dtype", "shape", "offsets", "rename", "delete", "add", "entry"])
    if not isinstance(entry, dict) and op in ("dtype", "shape", "offsets", "add"):
        op = "entry"
    if op == "dtype":
        entry["dtype"] = rng.choice(DTYPES)
    elif op == "shape":
        entry["shape"] = rng.choice([[], [1], [2, 5, 1], [0, 5], [-1, 5], [2**40, 5], ["a", 5], [2.5, 5],
                                     list(reversed(entry["shape"])), [entry["shape"][0] + 1, entry["shape"][1]]])
    elif op == "offsets":
        a, b = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[b, a], [a, b + 4], [a, 2**62], [-8, b], [a], "x", [a + 1, b + 1]])
    elif op == "rename":
        header[rng.choice(["x.weight", key.replace("lora_A", "lora_B"), key.replace(".weight", ".bias"),
                           key.replace("lora_A", "lora_embedding_A"), "a.lora_magnitude_vector"])] = header.pop(key)
    elif op == "delete":
        del header[key]
    elif op == "add":
        header[key.replace("q_proj", "k_proj")] = dict(entry)
    else:
        header[key] = rng.choice(VALUES)


@pytest.mark.parametrize("family", ["config_bytes", "config_fields", "header_bytes", "header_fields"])
def test_corrupt_adapter_loads_or_is_refused_in_one_line(adapter, tmp_path, family):
    rng = random.Random(f"lorablocks-fuzz-{family}")
    config_text = (adapter / CONFIG_NAME).read_text()
    weights = (adapter / WEIGHTS_NAME).read_bytes()
    header_end = 8 + int.from_bytes(weights[:8], "little")
    outcomes = {"ok": 0, "refused": 0}
    for i in range(CASES):
        path = _case(adapter, tmp_path, i % 4)
        if family == "config_bytes":
            (path / CONFIG_NAME).write_bytes(_flip(rng, config_text.encode()))
        elif family == "config_fields":
            config = json.loads(config_text)
            for _ in range(rng.randint(1, 3)):
                key = rng.choice(CONFIG_KEYS)
                if rng.random() < 0.15:
                    config.pop(key, None)
                else:
                    config[key] = rng.choice(VALUES)
            (path / CONFIG_NAME).write_text(json.dumps(config))
        elif family == "header_bytes":
            data = weights if rng.random() < 0.8 else rng.getrandbits(64).to_bytes(8, "little") + weights[8:]
            (path / WEIGHTS_NAME).write_bytes(_flip(rng, data, 0, header_end))
        else:
            header, body = _split(weights)
            for _ in range(rng.randint(1, 2)):
                if len(header) > 1:
                    _mutate_header(rng, header)
            (path / WEIGHTS_NAME).write_bytes(_join(header, body))
        outcomes[_check(path)] += 1
    assert outcomes["refused"] > CASES // 4  # the corruption did reach the reader
