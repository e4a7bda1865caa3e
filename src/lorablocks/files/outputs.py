"""Atomic outputs, file fingerprints and provenance records.

Every artefact is written into a hidden temporary sibling (``.NAME.tmp-PID-XXXX``), fsynced, and moved into
place at the end, so an interrupted run never leaves a half-written output. Without ``force`` the final move
never replaces anything (Linux ``renameat2(RENAME_NOREPLACE)``, else a lock file and a re-check): an output
that appeared during the run is left untouched and the new one discarded. With ``force`` only what
:func:`check_replaceable` allows is replaced: a previous lorablocks output of the same kind, or an ordinary
file for a file output; never the current folder or one above it, a folder that holds an input, a folder
where a file is written, or a folder lorablocks did not make. No output is ever an input of the command,
holds one or lies inside an input folder: the inputs a call passes, and every file or folder the running
command has read (readers call :func:`note_input`; the CLI records per command with :func:`reading_inputs`). The replacement is an atomic exchange
(``RENAME_EXCHANGE``), so there is no moment without an output. Outputs get the umask's permissions;
temporary outputs left by a killed run are swept by the next run to the same output.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lorablocks.errors import LoraBlocksError, OutputExistsError, one_line
from lorablocks.files.interrupts import interrupt_noted, note_interrupt, refuse_if_interrupted, writing, writing_output
from lorablocks.files.records import (RECORD_NAME, STUDY_MARKER, TRAIN_RECORD_NAME, input_refusal, note_input,
                                      output_kind, reading_inputs, refusal, sha256_file, sha256_path, utc_now,
                                      versions)

__all__ = [
    "atomic_dir",
    "atomic_file",
    "check_not_input",
    "interrupt_noted",
    "note_interrupt",
    "writing",
    "check_output_free",
    "check_replaceable",
    "input_refusal",
    "note_input",
    "reading_inputs",
    "output_kind",
    "one_line",
    "OutputRefusedError",
    "OutputWriteError",
    "RECORD_NAME",
    "TRAIN_RECORD_NAME",
    "STUDY_MARKER",
    "sha256_file",
    "sha256_path",
    "versions",
    "write_json",
    "utc_now",
]

#: Temporary outputs older than this are swept even when their process may still live (pid reuse).
STALE_SECONDS = 24 * 3600
_LOCK_STALE_SECONDS = 60
_AT_FDCWD, _NOREPLACE, _EXCHANGE = -100, 1, 2


class OutputRefusedError(OutputExistsError):
    """The output path holds something lorablocks may not replace, even when asked to replace outputs."""

    def __init__(self, message: str, path: str | os.PathLike) -> None:
        super().__init__(message)
        self.path = Path(path)


class OutputWriteError(LoraBlocksError):
    """Writing an output failed (disk full, permission denied); the message names the output path."""

    def __init__(self, message: str, path: str | os.PathLike) -> None:
        super().__init__(message)
        self.path = Path(path)


def _exists(path: Path, message: str | None = None, replaceable: bool = True) -> OutputExistsError:
    """An existing output that asking to replace outputs would replace: ``.path`` names it and
    ``.replaceable`` is True, so that a front end can say how to ask (the CLI: ``--force``)."""
    err = OutputExistsError(message or f"{path} exists; choose another output path")
    err.path, err.replaceable = path, replaceable  # type: ignore[attr-defined]
    return err


def check_replaceable(path: str | os.PathLike, kind: str | None = None, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Raise :class:`OutputRefusedError` unless an output of ``kind`` may replace what is at ``path``.

    ``kind`` is ``"file"`` for a file output (an existing file may be replaced, a folder never), a folder kind
    (``adapter``, ``merged-model``, ``study``: only a lorablocks output of that kind), or None (a file, or any
    lorablocks output folder). The current folder, its ancestors and folders holding ``inputs`` never are.
    """
    reason = refusal(Path(path), kind, list(inputs))
    if reason is not None:
        raise _refused(Path(path), reason, force=True)


def _refused(path: Path, reason: str, force: bool) -> OutputRefusedError:
    if force:
        return OutputRefusedError(f"{path} {reason}; lorablocks replaces only its own previous outputs", path)
    exists = "exists and " if os.path.lexists(path) else ""
    return OutputRefusedError(f"{path} {exists}{reason}; choose another output path", path)


def check_not_input(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse (:class:`OutputRefusedError`) an output folder or file at ``path`` that is, holds or lies
    inside one of ``inputs`` or an input the running command has read; for outputs written piecemeal inside
    ``path`` later (a study), so that the refusal comes before the work. Return it as a Path."""
    reason = input_refusal(path, inputs)
    if reason is not None:
        raise OutputRefusedError(f"{path} {reason}; an output never replaces or lies inside an input", path)
    return Path(path)


def check_output_free(path: str | os.PathLike, force: bool = False, *, kind: str | None = None,
                      inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an existing output path (:class:`OutputExistsError`) unless ``force`` and
    :func:`check_replaceable` allows it; return it as a Path. Creates nothing."""
    path = Path(path)
    reason = refusal(path, kind, list(inputs))
    if reason is not None:
        raise _refused(path, reason, force)
    if not force and os.path.lexists(path):
        raise _exists(path)
    return path


# --- the final move ---------------------------------------------------------------------------------------


def _renameat2_fn() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2_fn()


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2``: True when done, False when this system or file system does not support it."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(dst))


def _place(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``, never replacing anything: FileExistsError when ``final`` exists."""
    if _renameat2(tmp, final, _NOREPLACE):
        return
    lock = final.with_name(f".{_stem(final)}.lock")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "another process is finishing this output", str(final)) from None
    try:
        os.close(fd)
        if os.path.lexists(final):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(final))
        try:
            os.rename(tmp, final)  # Linux refuses a non-empty folder here
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(final)) from exc
            raise
    finally:
        os.unlink(lock)


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp`` with no moment without an output (exchange, then remove the old one)."""
    if not os.path.lexists(final):
        _place(tmp, final)
        return
    if not _renameat2(tmp, final, _EXCHANGE):
        old = final.with_name(f".{_stem(final)}.old-{os.getpid()}-{os.urandom(4).hex()}")
        os.rename(final, old)
        os.rename(tmp, final)
        tmp = old
    _remove(tmp)


def _remove(path: Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _fsync(path: str | os.PathLike, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    """fsync every regular file and folder under ``root``, so the move publishes complete data."""
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                _fsync(path)
        _fsync(folder, directory=True)


def _finish(tmp: Path, final: Path, force: bool, kind: str | None, inputs: list, strict: bool) -> None:
    """Move the finished ``tmp`` into place (see the module docstring); on refusal or after an interrupt
    remove ``tmp``."""
    try:
        refuse_if_interrupted()
        if force:
            reason = refusal(final, kind, inputs, strict)
            if reason is not None:
                raise _refused(final, reason, force)
            _swap_in(tmp, final)
        else:
            _place(tmp, final)
        with contextlib.suppress(OSError):
            _fsync(final.parent, directory=True)
    except FileExistsError:
        _remove(tmp)
        raise _exists(final, f"{final} appeared while the output was being written; it was left untouched "
                             "and the new output discarded", replaceable=False) from None
    except OSError as exc:
        _remove(tmp)
        raise OutputWriteError(f"cannot write {final}: {exc.strerror or one_line(exc)}", final) from exc
    except BaseException:
        _remove(tmp)
        raise


# --- temporary outputs ------------------------------------------------------------------------------------


def _stem(final: Path) -> str:
    return final.name[:120]  # room for the suffixes within the 255-byte name limit


def _umask() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists but belongs to someone else
    return True


_LEFTOVER = re.compile(r"(?:tmp|old)-(?P<pid>\d+)-\w+")


def _sweep(final: Path) -> None:
    """Remove temporary outputs for ``final`` left by runs that died (pid gone, or over a day old)."""
    prefix = f".{_stem(final)}."
    try:
        names = [n for n in os.listdir(final.parent) if n.startswith(prefix)]
    except OSError:
        return
    now = time.time()
    for name in names:
        path = final.parent / name
        try:
            age = now - os.lstat(path).st_mtime
        except OSError:
            continue
        if name == prefix + "lock":
            if age > _LOCK_STALE_SECONDS:
                _remove(path)
            continue
        m = _LEFTOVER.fullmatch(name[len(prefix):])
        if m is not None and (not _alive(int(m["pid"])) or age > STALE_SECONDS):
            _remove(path)


def _start(final: Path, force: bool, kind: str | None, inputs: list, strict: bool) -> None:
    """Refuse early what the final move would refuse; make the parent folders; sweep leftovers."""
    reason = refusal(final, kind, inputs, strict)
    if reason is not None:
        raise _refused(final, reason, force)
    if not force and os.path.lexists(final):
        raise _exists(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputWriteError(f"cannot write {final}: {exc.strerror or one_line(exc)}", final) from exc
    _sweep(final)


def _write_error(exc: BaseException, tmp: Path, final: Path) -> OutputWriteError | None:
    """A failure to write the temporary output, re-phrased to name ``final``; None for other errors."""
    name = type(exc).__name__
    if isinstance(exc, LoraBlocksError) or not isinstance(exc, Exception):
        return None
    text = one_line(exc)
    if isinstance(exc, OSError):
        ours = str(exc.filename or "").startswith(str(tmp)) or exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
        reason = exc.strerror or text
    else:
        ours = name == "SafetensorError" and (str(tmp) in text or "IoError" in text or "os error" in text.lower())
        # "IoError(Os { code: 28, ..., message: \"No space left on device\" })" or "I/O error: ... (os error 2)"
        inner = re.search(r'message: "([^"]+)"|I/O error: ([^(]+?) \(os error', text)
        reason = (inner[1] or inner[2]) if inner else text.replace(str(tmp), str(final))
    return OutputWriteError(f"cannot write {final}: {reason}", final) if ours else None


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False, *, kind: str | None = None,
               inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; when the block succeeds, move it to ``path`` (see the
    module docstring), on an error remove it.

    ``kind`` names the output (``adapter``, ``merged-model``): with ``force`` only a lorablocks output of
    that kind is replaced. Without ``kind``, ``force`` may replace any folder lorablocks owns (a cache).
    ``inputs`` are paths the output must never replace or contain.
    """
    with writing_output():
        yield from _atomic_dir(Path(path), force, kind, list(inputs))


def _atomic_dir(final: Path, force: bool, kind: str | None, inputs: list) -> Iterator[Path]:
    strict = kind is not None
    _start(final, force, kind or "folder", inputs, strict)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{_stem(final)}.tmp-{os.getpid()}-", dir=final.parent))
        os.chmod(tmp, 0o777 & ~_umask())
    except OSError as exc:
        raise OutputWriteError(f"cannot write {final}: {exc.strerror or one_line(exc)}", final) from exc
    try:
        yield tmp
        _sync_tree(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        err = _write_error(exc, tmp, final)
        if err is None:
            raise
        raise err from exc
    _finish(tmp, final, force, kind or "folder", inputs, strict)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, force: bool = False, mode: str = "w", *,
                inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Any]:
    """Open a temporary file beside ``path`` for writing; move it into place when the block succeeds.
    With ``force`` an existing file is replaced, never a folder."""
    with writing_output():
        yield from _atomic_file(Path(path), force, mode, list(inputs))


def _atomic_file(final: Path, force: bool, mode: str, inputs: list) -> Iterator[Any]:
    _start(final, force, "file", inputs, True)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{_stem(final)}.tmp-{os.getpid()}-", dir=final.parent)
        os.fchmod(fd, 0o666 & ~_umask())
    except OSError as exc:
        raise OutputWriteError(f"cannot write {final}: {exc.strerror or one_line(exc)}", final) from exc
    tmp = Path(name)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            if not fh.closed:
                fh.flush()
                os.fsync(fh.fileno())
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        err = _write_error(exc, tmp, final)
        if err is None:
            raise
        raise err from exc
    _finish(tmp, final, force, "file", inputs, True)


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
