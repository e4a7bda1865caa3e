"""Command-line interface: ``lorablocks VERB ...``. Importing the verb modules registers them."""

from __future__ import annotations

import importlib
import importlib.util

from lorablocks.cli.app import app, main, run_app

# Each verb module registers its commands on ``app`` when imported.
for _name in ("adapters", "training", "study", "serving"):
    if importlib.util.find_spec(f"lorablocks.cli.{_name}") is not None:
        importlib.import_module(f"lorablocks.cli.{_name}")

__all__ = ["app", "main", "run_app"]
