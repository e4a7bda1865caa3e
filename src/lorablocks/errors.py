"""Typed errors. The library raises these; the CLI turns them into one line and a non-zero exit."""

from __future__ import annotations

__all__ = [
    "LoraBlocksError",
    "AdapterFormatError",
    "UnsupportedAdapterError",
    "ShapeMismatchError",
    "NonFiniteError",
    "OutputExistsError",
    "DataError",
    "ModelError",
    "ConfigError",
    "CompositionError",
    "BaseModelMismatchError",
    "one_line",
]


class LoraBlocksError(Exception):
    """Base class of every error that lorablocks reports to the user as one line.

    Messages speak of the library (settings, files), never of command-line flags. ``setting`` names the
    setting at fault, when there is one, so that a front end (the CLI, the server) can name its own
    spelling of it (``--weights``, a JSON field).
    """

    def __init__(self, message: str = "", *, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


class AdapterFormatError(LoraBlocksError):
    """A path is missing, is not a PEFT LoRA adapter, or its files are corrupt."""


class UnsupportedAdapterError(LoraBlocksError):
    """The adapter uses a feature that cannot be represented exactly as a sum of deltas."""


class ShapeMismatchError(LoraBlocksError):
    """Adapters (or an adapter and a model) do not fit together."""


class NonFiniteError(LoraBlocksError):
    """A tensor holds NaN or inf."""


class OutputExistsError(LoraBlocksError):
    """The output path exists and overwriting was not asked for."""


class DataError(LoraBlocksError):
    """A dataset file is missing, empty or malformed."""


class ModelError(LoraBlocksError):
    """A base model cannot be found or loaded."""


class ConfigError(LoraBlocksError):
    """A configuration is invalid; the message lists every problem."""


class CompositionError(LoraBlocksError):
    """A composition recipe is invalid: weights, method, or a method parameter."""


class BaseModelMismatchError(ShapeMismatchError):
    """Adapters (or an adapter and a model) record different base models."""


def one_line(exc: BaseException) -> str:
    """The first non-empty line of ``exc``'s message; its class name when the message is empty."""
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not hide the error itself
        text = ""
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:500]
    return type(exc).__name__
