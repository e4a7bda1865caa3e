"""Ctrl-C and atomic outputs: whether an output is being written now, and whether the user interrupted.

The CLI's SIGINT handler asks :func:`writing` whether to exit at once (nothing half-written can be left) or to
unwind (so that the writer removes its temporary output), and calls :func:`note_interrupt`; the writers in
:mod:`lorablocks.files.outputs` call :func:`refuse_if_interrupted` before they publish, so no output is moved
into place after an interrupt, even one a library swallowed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["note_interrupt", "interrupt_noted", "writing", "writing_output", "refuse_if_interrupted"]


#: Atomic writers open in this process, and whether Ctrl-C was pressed (see :func:`note_interrupt`).
_WRITING = 0
_INTERRUPTED = False


def note_interrupt() -> None:
    """Record that the user interrupted the process (the CLI's SIGINT handler calls this): from now on no
    output is moved into place, even if the KeyboardInterrupt was swallowed by some library on its way up."""
    global _INTERRUPTED
    _INTERRUPTED = True


def interrupt_noted() -> bool:
    """Whether :func:`note_interrupt` was called."""
    return _INTERRUPTED


def writing() -> bool:
    """Whether an atomic output is being written now (an interrupt must then unwind, to remove it)."""
    return _WRITING > 0


@contextlib.contextmanager
def writing_output() -> Iterator[None]:
    """Count an atomic output as being written while the block runs."""
    global _WRITING
    _WRITING += 1
    try:
        yield
    finally:
        _WRITING -= 1


def refuse_if_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was noted: called just before an output is moved into place."""
    if _INTERRUPTED:
        raise KeyboardInterrupt
