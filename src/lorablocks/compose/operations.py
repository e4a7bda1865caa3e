"""File-level operations behind the ``combine``, ``subtract``, ``similarity`` and ``inspect`` verbs.

Each function validates its inputs completely before it writes anything, calls the pure math in
:mod:`lorablocks.core.algebra` / :mod:`lorablocks.core.overlap`, and writes its output atomically with a record of
its inputs (paths and sha256), weights, rank mode, truncation error and versions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorablocks.core import algebra
from lorablocks.files.adapters import Adapter, AdapterFile, AdapterWriter, load_adapter, open_adapter
from lorablocks.errors import AdapterFormatError, LoraBlocksError, ShapeMismatchError
from lorablocks.files.outputs import atomic_dir, check_output_free, utc_now, versions
from lorablocks.core.overlap import adapter_stats, overlap_matrices

__all__ = [
    "parse_rank",
    "parse_weights",
    "open_adapters",
    "load_adapters",
    "CombineResult",
    "combine_adapters",
    "combine_files",
    "similarity_report",
    "inspect_report",
]


def parse_rank(value: str | int) -> str | int:
    """``concat``, ``minimal`` or a positive integer."""
    if isinstance(value, int) or str(value).isdigit():
        n = int(value)
        if n < 1:
            raise LoraBlocksError(f"--rank must be concat, minimal or a positive integer, got {value}")
        return n
    if value not in ("concat", "minimal"):
        raise LoraBlocksError(f"--rank must be concat, minimal or a positive integer, got {value!r}")
    return value


def parse_weights(text: str | None, n: int) -> list[float]:
    """Comma-separated weights, one per adapter (default all 1)."""
    if text is None:
        return [1.0] * n
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise LoraBlocksError(f"--weights must be comma-separated numbers, got {text!r}")
    if len(weights) != n:
        raise LoraBlocksError(f"--weights has {len(weights)} values for {n} adapters")
    if not all(math.isfinite(w) for w in weights):
        raise LoraBlocksError(f"--weights must be finite numbers, got {text!r}")
    return weights


def open_adapters(paths: Sequence[str | os.PathLike]) -> list[AdapterFile]:
    """Open every adapter (headers only) and check that they fit together before any work."""
    if not paths:
        raise LoraBlocksError("no adapters given")
    files = [open_adapter(p) for p in paths]
    algebra.check_compatible([f.shapes for f in files], [str(f.path) for f in files])
    if len({f.fan_in_fan_out for f in files}) > 1:
        raise ShapeMismatchError("the adapters disagree on fan_in_fan_out: they were made for different model types")
    return files


def load_adapters(paths: Sequence[str | os.PathLike]) -> list[Adapter]:
    """Open, check and read every adapter completely."""
    return [f.load() for f in open_adapters(paths)]


@dataclass
class CombineResult:
    delta: algebra.Delta
    report: algebra.CompressionReport
    record: dict[str, Any]


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise, inflating peak RSS module by module)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to do
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def combine_adapters(
    adapters: Sequence[AdapterFile | Adapter], weights: Sequence[float], rank: str | int = "minimal",
    rtol: float = 1e-6, sink: Callable[[str, algebra.LowRank], None] | None = None,
) -> CombineResult:
    """``sum_i w_i delta_i`` at the requested rank, with the record of what went in.

    Works one module at a time: the module's factors are read (from disk for an :class:`AdapterFile`),
    concatenated and compressed before the next module is touched. With a ``sink`` (e.g.
    :meth:`AdapterWriter.add`) each finished module is handed over and not kept (``result.delta`` stays
    empty), so memory holds one module's inputs and output at a time, whatever the adapters' size.
    """
    if len(weights) != len(adapters):
        raise LoraBlocksError(f"{len(weights)} weights for {len(adapters)} adapters")

    def modules(a) -> list[str]:
        return a.modules if isinstance(a, AdapterFile) else list(a.delta)

    def factors(a, name: str) -> algebra.LowRank:
        return a.factors(name) if isinstance(a, AdapterFile) else a.delta[name]

    names = list(dict.fromkeys(n for a in adapters for n in modules(a)))
    delta: algebra.Delta = {}
    report = algebra.CompressionReport(mode=str(rank))
    for name in names:
        total = algebra.add([{name: factors(a, name)} if name in modules(a) else {} for a in adapters], weights)
        out, rep = algebra.compress(total, rank=rank, rtol=rtol)
        if sink is None:
            delta.update(out)
        else:
            for module, x in out.items():
                sink(module, x)
        report.update(rep)
        del total, out
        _release_freed_memory()
    record = {
        "operation": "combine",
        "inputs": [a.provenance() for a in adapters],
        "weights": list(weights),
        "rank_mode": str(rank),
        "rtol": rtol,
        "truncation": report.to_dict(),
        "base_models": sorted({str(a.base_model) for a in adapters}),
    }
    return CombineResult(delta=delta, report=report, record=record)


def combine_files(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    rank: str | int = "minimal",
    rtol: float = 1e-6,
    merge_into: str | os.PathLike | None = None,
    force: bool = False,
) -> CombineResult:
    """Combine adapter folders and write the result as an adapter, or merged into a model folder."""
    check_output_free(out, force)  # fail before any work
    files = open_adapters(paths)
    weights = list(weights) if weights is not None else [1.0] * len(files)
    if merge_into is not None:
        result = combine_adapters(files, weights, rank, rtol)
        merge_model_folder(merge_into, result.delta, out, result.record, force=force)
        return result
    with AdapterWriter(out, base_model=files[0].base_model, fan_in_fan_out=files[0].fan_in_fan_out,
                       task_type=files[0].config.get("task_type", "CAUSAL_LM"), force=force) as writer:
        result = combine_adapters(files, weights, rank, rtol, sink=writer.add)
        writer.record = result.record
    return result


def merge_model_folder(
    model_dir: str | os.PathLike, delta: algebra.Delta, out: str | os.PathLike, record: dict, force: bool = False
) -> Path:
    """Load a local model folder, add ``delta`` to its weights and save a normal model folder."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorablocks.model.merge import apply_delta

    from lorablocks.model.models import BUILTIN_MODELS, resolve_model

    if str(model_dir) in BUILTIN_MODELS:
        model_dir = resolve_model(str(model_dir))  # the converted built-in model's folder
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise AdapterFormatError(
            f"{model_dir} is not a model folder (no config.json); --merge-into takes a local model folder "
            f"or a built-in model name ({', '.join(BUILTIN_MODELS)})"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", local_files_only=True)
    except (OSError, ValueError) as exc:
        raise LoraBlocksError(f"cannot load the model in {model_dir}: {str(exc).splitlines()[0]}")
    with torch.no_grad():
        apply_delta(model, delta)
    with atomic_dir(out, force=force) as tmp:
        model.save_pretrained(tmp)
        try:
            AutoTokenizer.from_pretrained(model_dir, local_files_only=True).save_pretrained(tmp)
        except (OSError, ValueError):
            pass  # a model folder without a tokenizer stays without one
        full = {"tool": "lorablocks", "created": utc_now(), "versions": versions(), **record,
                "merged_into": str(model_dir)}
        (tmp / "lorablocks.json").write_text(json.dumps(full, indent=2, default=str) + "\n")
    return Path(out)


def similarity_report(paths: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """The overlap of N adapters: N x N RMS and mean cosine, and per-module cosines per pair."""
    adapters = load_adapters(paths)
    if len(adapters) < 2:
        raise LoraBlocksError("similarity needs at least two adapters")
    rms, mean, pairs = overlap_matrices([a.delta for a in adapters])
    set_rms, set_mean = pairs.rms_cosine, pairs.mean_cosine

    def clean(v: float) -> float | None:
        return None if math.isnan(v) else v

    return {
        "adapters": [str(a.path) for a in adapters],
        "sha256": [a.sha256 for a in adapters],
        "rms_cosine": [[clean(v) for v in row] for row in rms],
        "mean_cosine": [[clean(v) for v in row] for row in mean],
        "set": {"rms_cosine": clean(set_rms), "mean_cosine": clean(set_mean)},
        "pairs": [
            {
                "a": str(adapters[i].path),
                "b": str(adapters[j].path),
                "rms_cosine": clean(p.rms_cosine),
                "mean_cosine": clean(p.mean_cosine),
                "modules": {m: clean(c) for m, c in p.cosines.items()},
            }
            for (i, j), p in pairs.pairs.items()
        ],
        "versions": versions(),
    }


def inspect_report(path: str | os.PathLike) -> dict[str, Any]:
    """One adapter: its config essentials and per-module rank, scale, norm and effective rank."""
    a = load_adapter(path)
    stats = adapter_stats(a.delta)
    return {
        "path": str(a.path),
        "sha256": a.sha256,
        "base_model": a.base_model,
        "r": a.config.get("r"),
        "lora_alpha": a.config.get("lora_alpha"),
        "use_rslora": bool(a.config.get("use_rslora", False)),
        "fan_in_fan_out": a.fan_in_fan_out,
        "n_modules": len(a.delta),
        "total_norm": stats.total_norm,
        "modules": {
            m: {
                "shape": list(a.delta[m].shape),
                "rank": stats.ranks[m],
                "alpha": a.module_scales[m][1],
                "scale": a.module_scales[m][2],
                "norm": stats.norms[m],
                "effective_rank": stats.effective_ranks[m],
            }
            for m in a.delta
        },
    }
