"""Atomic outputs, file fingerprints and provenance records.

Every artefact is written into a hidden sibling folder (or file) first and renamed into place at the end,
so an interrupted run never leaves a half-written output; an existing output is refused unless ``force``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lorablocks.errors import LoraBlocksError, OutputExistsError

__all__ = [
    "atomic_dir",
    "atomic_file",
    "check_output_free",
    "sha256_file",
    "sha256_path",
    "versions",
    "write_json",
    "utc_now",
]


def check_output_free(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse an existing output path unless ``force``; return it as a Path."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists; choose another output path or pass --force to replace it")
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _replace(tmp: Path, final: Path) -> None:
    if final.exists() or final.is_symlink():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success rename it to ``path``, on error remove it."""
    final = check_output_free(path, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace(tmp, final)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, force: bool = False, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside ``path`` for writing; rename it into place when the block succeeds."""
    final = check_output_free(path, force)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _replace(tmp, final)


def write_json(path: str | os.PathLike, obj: Any, force: bool = False) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_file(path, force=force) as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=_json_default)
        fh.write("\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of one file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_path(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of a folder's files (relative names and contents, sorted)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise LoraBlocksError(f"{path} does not exist")
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(b"\0")
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape the numbers."""
    out = {"python": platform.python_version()}
    import importlib.metadata as md

    for name in ("lorablocks", "torch", "transformers", "peft", "accelerate", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
