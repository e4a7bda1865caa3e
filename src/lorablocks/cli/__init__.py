"""Command-line interface: ``lorablocks VERB ...``.

Importing this package imports nothing heavy: the Typer app and the verb modules (which register their
commands on it, and import torch) are loaded by :func:`run_app`/:func:`main`. Each run records the files it
reads (:func:`lorablocks.files.outputs.reading_inputs`), so that no output ever replaces or lies inside one.

Ctrl-C: :func:`main` installs its SIGINT handler first, before any heavy import. While no output is being
written it prints one line and exits 130 at once (a KeyboardInterrupt raised inside torch's C++ code would
abort the process, and one swallowed by a library's ``except`` would be ignored). While an output is being
written it raises KeyboardInterrupt, so that the writer removes its temporary output, and it records the
interrupt, so that no output is moved into place afterwards even if the exception was swallowed: exit 130,
one line, nothing written. ``lorablocks.cli.app`` is the Typer application once loaded.
"""

from __future__ import annotations

# only what the interpreter has loaded anyway: the SIGINT handler is installed before any other import
import os
import signal
import sys

TYPE_CHECKING = False  # typing is not imported at run time (see above)
if TYPE_CHECKING:
    from types import ModuleType
    from typing import Any

__all__ = ["app", "main", "run_app", "INTERRUPTED", "install_interrupt_handler", "raise_on_interrupt"]

#: The one line an interrupted command prints (exit code 130).
INTERRUPTED = "interrupted (outputs are written atomically: nothing half-written is left)"

_VERBS = ("adapters", "training", "evaluation", "statistics", "study", "serving", "export")
#: True once a verb takes Ctrl-C as an ordinary stop (a running server): the handler then always raises.
_RAISE = False


def _outputs(name: str) -> Any:
    """A function of the output module if that is loaded (nothing is written before it is, or while it is
    still being imported); never imports it, so that the handler works before anything heavy is loaded."""
    return getattr(sys.modules.get("lorablocks.files.outputs"), name, None)


def _on_sigint(signum: int, frame: Any) -> None:
    """SIGINT: unwind when an output is being written (or a verb asked to), else one line and exit 130 now."""
    note, writing = _outputs("note_interrupt"), _outputs("writing")
    if note is not None:
        note()
    if _RAISE or (writing is not None and writing()):
        raise KeyboardInterrupt
    try:
        os.write(2, (INTERRUPTED + "\n").encode())
    finally:
        os._exit(130)


def install_interrupt_handler() -> None:
    """Take over Ctrl-C for this process as the module docstring says (the console entry point does)."""
    signal.signal(signal.SIGINT, _on_sigint)


def raise_on_interrupt() -> None:
    """From now on Ctrl-C raises KeyboardInterrupt (for a verb that stops cleanly on it: ``serve`` once it serves)."""
    global _RAISE
    _RAISE = True


def _load() -> ModuleType:
    """Import the app module and every verb module (each registers its commands); return the app module."""
    import importlib
    import importlib.util

    # Idle OpenMP threads sleep instead of spinning: on shared cores spinning threads made steps 10-30x slower
    # (benchmarks/bench_precision.py); must be set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    module = importlib.import_module("lorablocks.cli.app")
    for name in _VERBS:
        if importlib.util.find_spec(f"lorablocks.cli.{name}") is not None:
            importlib.import_module(f"lorablocks.cli.{name}")
    globals()["app"] = module.app  # the package attribute is the Typer app, not the submodule
    return module


def run_app(argv: list[str] | None = None) -> int:
    """Run the CLI in this process and return its exit code (see :mod:`lorablocks.cli.app`)."""
    from lorablocks.files.outputs import reading_inputs

    with reading_inputs():
        try:
            module = _load()
        except KeyboardInterrupt:
            sys.stderr.write(INTERRUPTED + "\n")
            return 130
        return module.run_app(argv)


def main() -> None:
    """Console entry point: exit with :func:`run_app`'s code; Ctrl-C at any moment exits 130 with one line."""
    try:
        install_interrupt_handler()
    except ValueError:  # not the main thread (an embedding application): its own Ctrl-C handling stays
        pass
    try:
        code = run_app(sys.argv[1:])
    except KeyboardInterrupt:  # between the boundary's own handlers
        code = -1
    noted = _outputs("interrupt_noted")
    if code == -1 or (code != 130 and noted is not None and noted() and not _RAISE):
        sys.stderr.write(INTERRUPTED + "\n")  # interrupted, though a library swallowed the KeyboardInterrupt
        code = 130
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # done: a late Ctrl-C changes nothing now
    sys.exit(code)


def __getattr__(name: str) -> Any:
    if name == "app":
        return _load().app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
