"""Blocks for llama.cpp: a LoRA adapter as a llama.cpp adapter GGUF, or merged into a full model GGUF.

**Adapter** (``export_adapter_gguf``), as llama.cpp's ``convert_lora_to_gguf.py`` writes one:
``general.type = adapter``, ``general.architecture = llama``, ``adapter.type = lora``,
``adapter.lora.alpha``; per target module the tensors ``blk.N.attn_q.weight.lora_a`` (numpy shape
``(r, in)``, GGUF ``ne = [in, r]``) and ``.lora_b`` (``(out, r)``), names from the ``gguf`` package's
``TensorNameMap``, ``lora_b`` of the query and key projections in llama.cpp's row order
(:mod:`lorablocks.files.llama_gguf`). llama.cpp scales each module by ``scale * alpha / r_m`` with ``r_m``
that module's own rank (``lora_b->ne[0]``). The adapter reader folds every scale (``lora_alpha``,
``rank_pattern``, rsLoRA, a composition's weights) into ``A``; the file stores ``alpha`` = the most common
rank and each module's ``A`` times ``r_m / alpha``, so llama.cpp's factor undoes it exactly and the
adapter at scale 1 in llama.cpp is our delta.

**Model** (``export_model_gguf``): the base model's weights plus the delta, f32 or f16 (norms stay f32, as
convert_hf_to_gguf keeps 1-D tensors), tensor names and order, metadata and tokenizer copied from a
reference GGUF of the same base (the built-in model's own GGUF, or ``base_gguf``).

Both are written atomically; the file carries ``lorablocks.kind``, ``lorablocks.fingerprint`` and
``lorablocks.record`` (JSON) in its metadata, and ``force`` replaces only a GGUF lorablocks wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorablocks.core.algebra import LowRank
from lorablocks.errors import BaseModelMismatchError, LoraBlocksError, ModelError, NonFiniteError, ShapeMismatchError, UnsupportedAdapterError
from lorablocks.files.adapters import RECORD_NAME, AdapterFile, open_adapter
from lorablocks.files.llama_gguf import LlamaLayout, read_layout
from lorablocks.files.outputs import OutputRefusedError, atomic_file, check_output_free, utc_now, versions

__all__ = ["GgufExport", "OUTTYPES", "export_adapter_gguf", "export_model_gguf", "local_model_folder",
           "base_model_for", "source_record", "gguf_record"]

#: ``--outtype`` -> numpy dtype of 2-D tensors
OUTTYPES: dict[str, Any] = {"f32": np.float32, "f16": np.float16}
_SKIPPED_KV = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version", "lorablocks.")


@dataclass(frozen=True)
class GgufExport:
    """What was written: the file, its tensor count, the alpha stored, the fingerprint recorded."""

    path: Path
    kind: str
    tensors: int
    modules: int
    alpha: float | None
    fingerprint: str
    outtype: str


def local_model_folder(spec: str) -> Path:
    """``--model`` as a local folder (a built-in name is prepared in the cache); hub ids are refused."""
    from lorablocks.model.models import resolve_model

    found = resolve_model(spec)
    if not isinstance(found, Path):
        raise ModelError(f"model {spec!r} is not a local folder; export needs a local model folder or a "
                         "built-in model name", setting="model")
    return found


def base_model_for(file: AdapterFile, model: str | None, allow_base_mismatch: bool = False) -> str:
    """The model an adapter is exported against: ``model``, else the base its config records when that is a
    built-in model or a local folder, else the default model; a recorded base of another name is refused."""
    from lorablocks.model.models import BUILTIN_MODELS, DEFAULT_MODEL, same_base_model

    recorded = file.base_model
    if model is None:
        builtin = [n for n, b in BUILTIN_MODELS.items() if recorded in (n, *b.aliases)]
        model = builtin[0] if builtin else recorded if recorded and Path(recorded).is_dir() else DEFAULT_MODEL
    if not allow_base_mismatch and not same_base_model(recorded, model):
        raise BaseModelMismatchError(f"{file.path} was trained on {recorded}, not {model}",
                                     setting="allow_base_mismatch")
    return model


def source_record(file: AdapterFile) -> dict[str, Any]:
    """Where an exported adapter came from; its fingerprint is the recipe's when lorablocks composed it
    (its ``lorablocks.json``), else :func:`_block_fingerprint` (weights and effective scales)."""
    rec: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads((file.path / RECORD_NAME).read_text(encoding="utf-8"))
        if isinstance(loaded, dict) and loaded.get("tool") == "lorablocks":
            rec = loaded
    recipe = rec.get("recipe") if isinstance(rec.get("recipe"), dict) else rec  # newer records nest the recipe
    found = recipe.get("fingerprint", rec.get("fingerprint"))
    fingerprint = found if isinstance(found, str) and found else _block_fingerprint(file)
    return {"source": {**file.provenance(), "record": rec or None,
                       "module_scales": {m: list(s) for m, s in file.module_scales.items()}},
            "fingerprint": fingerprint}


def _block_fingerprint(file: AdapterFile) -> str:
    """A plain block: sha256 of its weights file's sha256 and :attr:`AdapterFile.scales_sha256` (``lora_alpha``,
    ``rank_pattern``, rsLoRA, ``fan_in_fan_out`` change the delta without changing the weights file)."""
    key = {"weights": file.sha256, "scales": file.scales_sha256}
    return "sha256:" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def gguf_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``lorablocks.record`` of a GGUF file lorablocks wrote; None for any other file."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields.get("lorablocks.record")
        rec = json.loads(field.contents()) if field is not None else None
    except Exception:  # not a GGUF file, or a corrupt one: not ours either way
        return None
    return rec if isinstance(rec, dict) and rec.get("tool") == "lorablocks" else None


def _check_output(out: Path, force: bool, inputs: Sequence[Any]) -> None:
    """Before any work: the output is free, or (``force``) a GGUF file lorablocks wrote."""
    check_output_free(out, force, kind="file", inputs=[p for p in inputs if p is not None])
    if force and out.is_file() and gguf_record(out) is None:
        raise OutputRefusedError(f"{out} is not a GGUF file lorablocks wrote; it was left untouched", out)


@contextlib.contextmanager
def _gguf_file(out: Path, force: bool, inputs: Sequence[Any], record: dict[str, Any]) -> Iterator[Any]:
    """A ``gguf.GGUFWriter`` on a temporary file that replaces ``out`` atomically when the block succeeds."""
    import gguf

    full = {"tool": "lorablocks", "created": utc_now(), "versions": versions(), **record}
    with atomic_file(out, force=force, mode="wb", inputs=[p for p in inputs if p is not None]) as fh:
        # the writer opens the temporary file by name (the same inode; atomic_file fsyncs it after)
        writer = gguf.GGUFWriter(os.readlink(f"/proc/self/fd/{fh.fileno()}"), "llama")
        writer.add_string("lorablocks.kind", str(record["kind"]))
        writer.add_string("lorablocks.fingerprint", str(record["fingerprint"]))
        writer.add_string("lorablocks.record", json.dumps(full, default=str, sort_keys=True))
        try:
            yield writer
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()


def _array(t: torch.Tensor, dtype: Any, name: str) -> np.ndarray:
    a = t.detach().to("cpu", torch.float32).contiguous().numpy().astype(dtype)
    if not np.isfinite(a).all():
        raise NonFiniteError(f"tensor {name} overflows {np.dtype(dtype).name}; export as f32")
    return a


def _model_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a model folder's safetensors weights (headers only)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            shapes.update({k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()})
    return shapes


def _check_fits(file: AdapterFile, model_dir: Path) -> None:
    if file.fan_in_fan_out:
        raise UnsupportedAdapterError(f"{file.path} stores transposed (fan_in_fan_out) factors: it is not for a Llama model")
    shapes = _model_shapes(model_dir)
    for module, shape in file.shapes.items():
        found = shapes.get(module + ".weight")
        if found != shape:
            what = "has no such module" if found is None else f"has it as {found[0]}x{found[1]}"
            raise ShapeMismatchError(f"{file.path}: module {module} is {shape[0]}x{shape[1]} but {model_dir} {what}")


def _stored_alpha(delta: Mapping[str, LowRank]) -> float:
    """The ``adapter.lora.alpha`` written: the most common rank (then those modules need no rescaling)."""
    counts = Counter(x.rank for x in delta.values())
    return float(max(counts, key=lambda r: (counts[r], r)))


def export_adapter_gguf(adapter: str | os.PathLike, out: str | os.PathLike, *, model: str | None = None,
                        outtype: str = "f32", allow_base_mismatch: bool = False, force: bool = False) -> GgufExport:
    """Write the adapter folder ``adapter`` (a block or a composition) as a llama.cpp LoRA adapter GGUF
    for the Llama model ``model`` (a local folder or built-in name, see :func:`base_model_for`: its config
    gives the head counts)."""
    dtype = _outtype(outtype)
    out, file = Path(out), open_adapter(adapter)
    _check_output(out, force, [file.path])
    model_dir = local_model_folder(base_model_for(file, model, allow_base_mismatch))
    layout = read_layout(model_dir)
    names = {m: layout.module_tensor(m) for m in file.modules}
    _check_fits(file, model_dir)
    delta = file.load().delta
    alpha = _stored_alpha(delta)
    src = source_record(file)
    record = {"kind": "gguf-adapter", "format": "gguf", "outtype": outtype, "model": str(model_dir),
              "alpha": alpha, "alpha_convention": "A stored times r_m/alpha; llama.cpp multiplies by alpha/r_m", **src}
    with _gguf_file(out, force, [file.path, model_dir], record) as w:
        import gguf

        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_name(file.name)
        w.add_file_type(_file_type(outtype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for module, x in delta.items():
            name = names[module]
            w.add_tensor(name + ".lora_a", _array(x.A * (x.rank / alpha), dtype, name + ".lora_a"))
            w.add_tensor(name + ".lora_b", _array(layout.to_gguf_rows(name, x.B), dtype, name + ".lora_b"))
    return GgufExport(out, "gguf-adapter", 2 * len(delta), len(delta), alpha, src["fingerprint"], outtype)


def _outtype(outtype: str) -> Any:
    if outtype not in OUTTYPES:
        raise LoraBlocksError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}", setting="outtype")
    return OUTTYPES[outtype]


def _file_type(outtype: str) -> int:
    import gguf

    return int(gguf.LlamaFileType.ALL_F32 if outtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)


def _reference_gguf(model: str, base_gguf: str | os.PathLike | None) -> Path:
    """The GGUF whose metadata and tokenizer the merged model takes: ``base_gguf``, else the built-in's."""
    from lorablocks.model.models import BUILTIN_MODELS, _gguf_location

    if base_gguf is not None:
        path = Path(base_gguf)
        if not path.is_file():
            raise ModelError(f"{path} is not a file", setting="base_gguf")
        return path
    if model in BUILTIN_MODELS:
        return _gguf_location(BUILTIN_MODELS[model])
    raise ModelError(f"a full-model GGUF of {model} needs a GGUF of the same base model for its tokenizer and "
                     "metadata (base_gguf); only built-in models have one already", setting="base_gguf")


def _check_reference(reader: Any, layout: LlamaLayout, ref: Path) -> None:
    """The reference GGUF is a llama model with the same layer and head counts as the model folder."""
    def value(key: str) -> Any:
        field = reader.fields.get(key)
        return field.contents() if field is not None else None

    if value("general.architecture") != "llama" or value("general.type") not in (None, "model"):
        raise ModelError(f"{ref} is not a llama-architecture model GGUF", setting="base_gguf")
    expected = {"llama.block_count": layout.n_layer, "llama.attention.head_count": layout.n_head,
                "llama.attention.head_count_kv": layout.n_head_kv,
                "llama.embedding_length": layout.config.get("hidden_size")}
    for key, want in expected.items():
        if value(key) != want:
            raise ModelError(f"{ref} has {key} = {value(key)} but the model folder has {want}: another base model",
                             setting="base_gguf")


def _copy_metadata(reader: Any, writer: Any) -> None:
    """Every KV of the reference GGUF except its file type and what the writer sets itself."""
    import gguf

    for key, field in reader.fields.items():
        if key.startswith(_SKIPPED_KV):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)


def _merged_state(model_dir: Path, file: AdapterFile) -> dict[str, torch.Tensor]:
    """The model folder's weights (float32) with the adapter's delta merged in."""
    from transformers import AutoModelForCausalLM

    from lorablocks.model.merge import apply_delta

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True,
                                                     use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the model in {model_dir}: {exc}") from None
    apply_delta(model, file.load().delta)
    return {k: v.detach() for k, v in model.state_dict().items()}


def _gguf_tensors(state: Mapping[str, torch.Tensor], layout: LlamaLayout, wanted: Sequence[str],
                  ref: Path) -> dict[str, torch.Tensor]:
    """GGUF name -> tensor (llama.cpp row order) for exactly the reference GGUF's tensors."""
    found: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        name = layout.tensor_name(key)
        if name == "output.weight" and layout.tied_embeddings:
            continue  # tied to token_embd: llama.cpp has no output tensor
        if name is None:
            raise UnsupportedAdapterError(f"model tensor {key} has no llama.cpp name")
        found[name] = layout.to_gguf_rows(name, t)
    missing, extra = [n for n in wanted if n not in found], sorted(set(found) - set(wanted))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which {ref} does not"
        raise ModelError(f"the model folder {what}: {ref} is not a GGUF of this model", setting="base_gguf")
    return found


def export_model_gguf(adapter: str | os.PathLike, out: str | os.PathLike, *, model: str | None = None,
                      outtype: str = "f16", base_gguf: str | os.PathLike | None = None,
                      allow_base_mismatch: bool = False, force: bool = False,
                      log: Callable[[str], None] = lambda message: None) -> GgufExport:
    """Write ``model`` with the adapter merged in as a full llama.cpp model GGUF (``outtype`` f16 or f32);
    tensor names, order, metadata and tokenizer follow ``base_gguf`` (default: the built-in model's GGUF).
    ``log`` hears of the long steps once every input has been checked."""
    import gguf

    dtype = _outtype(outtype)
    out, file = Path(out), open_adapter(adapter)
    model = base_model_for(file, model, allow_base_mismatch)
    ref = _reference_gguf(model, base_gguf)
    _check_output(out, force, [file.path, ref])
    model_dir = local_model_folder(model)
    layout = read_layout(model_dir)
    _check_fits(file, model_dir)
    reader = gguf.GGUFReader(str(ref))
    _check_reference(reader, layout, ref)
    order = [t.name for t in reader.tensors]
    log(f"merging {file.path} into {model_dir} and writing {len(order)} tensors ({outtype}) ...")
    tensors = _gguf_tensors(_merged_state(model_dir, file), layout, order, ref)
    src = source_record(file)
    record = {"kind": "gguf-model", "format": "gguf-model", "outtype": outtype, "model": str(model_dir),
              "reference_gguf": str(ref), **src}
    with _gguf_file(out, force, [file.path, model_dir, ref], record) as w:
        _copy_metadata(reader, w)
        w.add_file_type(_file_type(outtype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name in order:
            t = tensors[name]
            w.add_tensor(name, _array(t, dtype if t.dim() > 1 else np.float32, name))
    return GgufExport(out, "gguf-model", len(order), len(file.modules), None, src["fingerprint"], outtype)
