"""Records, fingerprints, and what an output may replace.

Every output lorablocks makes carries a record (``"tool": "lorablocks"`` and a ``kind``); :func:`output_kind`
reads it, and :func:`check_replaceable` decides, from it and the command's inputs, whether an output of a
given kind may replace what is at a path (see :mod:`lorablocks.files.outputs`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import queue
import stat
import threading
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lorablocks.errors import LoraBlocksError

__all__ = ["RECORD_NAME", "TRAIN_RECORD_NAME", "STUDY_MARKER", "note_input", "reading_inputs", "output_kind",
           "refusal", "input_refusal", "sha256_file", "PendingDigest", "sha256_path", "versions", "utc_now"]

#: The record lorablocks writes into every adapter and merged-model folder it makes.
RECORD_NAME = "lorablocks.json"
#: The record of a trained adapter.
TRAIN_RECORD_NAME = "lorablocks_train.json"
#: The marker of a study folder.
STUDY_MARKER = "study.json"
#: Record kinds that count as the same kind of output when replacing (a trained adapter is an adapter).
_FAMILY = {"train": "adapter"}
#: Output kinds lorablocks writes without sub-folders: one that has some holds something else (its inputs).
_FLAT = ("adapter", "merged-model")


# --- the inputs of the running command ---------------------------------------------------------------------

#: The real paths the running command has read (None: no command is running, nothing is recorded).
_READ: set[str] | None = None


def note_input(path: str | os.PathLike) -> None:
    """Record that the running command reads ``path`` (an adapter, data file or folder, model folder,
    config): no output of the command may be it, hold it or lie inside it. Every reader of user files calls
    this, so the rule holds for every verb whatever inputs a verb passes itself."""
    if _READ is not None:
        _READ.add(os.path.realpath(path))


@contextlib.contextmanager
def reading_inputs() -> Iterator[None]:
    """Record the inputs read inside the block (one command: the CLI wraps each run in it)."""
    global _READ
    outer, _READ = _READ, set()
    try:
        yield
    finally:
        _READ = outer


# --- what may be replaced ---------------------------------------------------------------------------------


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        if not path.is_file() or path.stat().st_size > 1 << 24:
            return None
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def output_kind(path: str | os.PathLike) -> str | None:
    """The kind of lorablocks output the folder ``path`` is (``adapter``, ``merged-model``, ``study``, ...),
    read from the record lorablocks writes into it (``"tool": "lorablocks"`` and a ``kind``); None for a
    folder lorablocks did not make. Records from before kinds were recorded are recognised by their content."""
    path = Path(path)
    for name in (RECORD_NAME, TRAIN_RECORD_NAME, STUDY_MARKER):
        rec = _read_record(path / name)
        if rec is None or rec.get("tool") != "lorablocks":
            continue
        kind = rec.get("kind")
        if name == STUDY_MARKER:
            if kind == "study":
                return "study"
            continue
        if not isinstance(kind, str) or not kind:
            kind = "merged-model" if "merged_into" in rec else "adapter" if (path / "adapter_config.json").is_file() else None
        if kind:
            return _FAMILY.get(kind, kind)
    return None


def _entry(path: Path) -> Path | None:
    """``path`` made absolute with its parent resolved (the entry itself is not followed); None for ``/``."""
    absolute = Path(os.path.abspath(path))
    if not absolute.name:
        return None
    return Path(os.path.realpath(absolute.parent)) / absolute.name


def _within(inner: str, outer: Path) -> bool:
    return inner == str(outer) or inner.startswith(str(outer).rstrip(os.sep) + os.sep)


def _want_dir(kind: str | None) -> bool | None:
    return None if kind is None else kind != "file"


def refusal(path: Path, kind: str | None, inputs: Iterable[str | os.PathLike], strict: bool = True) -> str | None:
    """Why ``path`` may not be replaced by an output of ``kind`` (``"file"``, a folder kind, or None for
    either), or None. ``strict=False`` lets a folder output replace any folder (caches lorablocks owns)."""
    entry = _entry(path)
    if entry is None:
        return "is the root folder"
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:  # the current folder was removed
        cwd = ""
    if cwd and _within(cwd, entry):
        return "is the current folder or a folder above it"
    reason = _input_reason(entry, inputs)
    if reason is not None:
        return reason
    try:
        mode = os.lstat(entry).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot be inspected ({exc.strerror})"
    want_dir = _want_dir(kind)
    if stat.S_ISLNK(mode):
        return "is a symbolic link" if want_dir or os.path.isdir(entry) else None
    if stat.S_ISREG(mode):
        return "is a file, not an output folder" if want_dir else None
    if not stat.S_ISDIR(mode):
        return "is not a regular file or folder"
    if want_dir is False:
        return "is a folder; a file output never replaces a folder"
    found = output_kind(entry)
    if strict and found is None:
        return "is a folder lorablocks did not make (it holds no lorablocks record)"
    if strict and kind is not None and found != _FAMILY.get(kind, kind):
        return f"is a lorablocks {found} output, not a {kind} output"
    if strict and found in _FLAT and _has_subfolder(entry):
        return f"holds folders, which no lorablocks {found} output has"
    return None


def _input_reason(entry: Path, inputs: Iterable[str | os.PathLike]) -> str | None:
    """Why an output at ``entry`` would replace an input: it is one, holds one, or lies inside one (the
    given ``inputs`` and every input the running command has read)."""
    for item in [*inputs, *sorted(_READ or ())]:
        real = os.path.realpath(item)
        if real == str(entry):
            return f"is the input {item}"
        if _within(real, entry):
            return f"holds the input {item}"
        if _within(str(entry), Path(real)) and os.path.isdir(real):
            return f"is inside the input {item}"
    return None


def input_refusal(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> str | None:
    """Why an output at ``path`` (or anything written inside it) would replace an input, or None."""
    entry = _entry(Path(path))
    return "is the root folder" if entry is None else _input_reason(entry, inputs)


def _has_subfolder(folder: Path) -> bool:
    try:
        return any(e.is_dir(follow_symlinks=False) for e in os.scandir(folder))
    except OSError:
        return True


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of one file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


class PendingDigest:
    """The SHA-256 of a file, computed on a background thread while the caller works on (hashing releases
    the GIL). :meth:`result` waits for it; a read error surfaces there as :class:`LoraBlocksError`. One
    worker hashes the queued files in order, so several large files do not compete for the cores."""

    _queue: queue.SimpleQueue[PendingDigest] | None = None
    _lock = threading.Lock()

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._done = threading.Event()
        self._value: str | None = None
        self._error: str | None = None
        with PendingDigest._lock:
            if PendingDigest._queue is None:  # a daemon thread: an exit (Ctrl-C included) never waits for it
                PendingDigest._queue = queue.SimpleQueue()
                threading.Thread(target=PendingDigest._work, name="lorablocks-sha256", daemon=True).start()
            PendingDigest._queue.put(self)

    @staticmethod
    def _work() -> None:
        while True:
            job = PendingDigest._queue.get()
            try:
                job._value = sha256_file(job.path)
            except OSError as exc:
                job._error = f"cannot read {job.path} ({exc.strerror or exc})"
            job._done.set()

    def result(self) -> str:
        self._done.wait()
        if self._error is not None:
            raise LoraBlocksError(self._error)
        return self._value


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
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
