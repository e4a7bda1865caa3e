"""Command-line interface: ``lorablocks VERB ...``.

Importing this package imports nothing heavy: the Typer app and the verb modules (which register their
commands on it, and import torch) are loaded by :func:`run_app`/:func:`main`, inside the interrupt
protection, so Ctrl-C at any moment, even during imports, exits 130 with one line and no traceback.
``lorablocks.cli.app`` is the Typer application once loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

__all__ = ["app", "main", "run_app", "INTERRUPTED"]

#: The one line an interrupted command prints (exit code 130).
INTERRUPTED = "interrupted (outputs are written atomically: nothing half-written is left)"

_VERBS = ("adapters", "training", "evaluation", "statistics", "study", "serving", "export")


def _load() -> ModuleType:
    """Import the app module and every verb module (each registers its commands); return the app module."""
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
    try:
        module = _load()
    except KeyboardInterrupt:
        sys.stderr.write(INTERRUPTED + "\n")
        return 130
    return module.run_app(argv)


def main() -> None:
    """Console entry point: exit with :func:`run_app`'s code; Ctrl-C at any moment exits 130 quietly."""
    try:
        code = run_app(sys.argv[1:])
    except KeyboardInterrupt:  # between the boundary's own handlers
        sys.stderr.write(INTERRUPTED + "\n")
        code = 130
    sys.exit(code)


def __getattr__(name: str) -> Any:
    if name == "app":
        return _load().app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
