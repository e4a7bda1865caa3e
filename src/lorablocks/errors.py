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
]


class LoraBlocksError(Exception):
    """Base class of every error that lorablocks reports to the user as one line."""


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
