"""Every training setting, declared once (pydantic): its type, bounds, default and help text.

Three pieces, so that the study reuses the first two as its ``lora`` and ``train`` sections:

- :class:`LoraSettings`: the LoRA of an adapter (the paper's: rank 4, alpha 64, dropout 0);
- :class:`OptimSettings`: the recipe of every step (optimizer, batches, lengths, data limits, checkpoints,
  numeric precision);
- :class:`TrainConfig`: both, plus what one run needs (model, data, output, steps, seed, resumption).

The ``lorablocks train`` flags and the keys of ``--config FILE`` are derived from :class:`TrainConfig`'s
fields (a field's ``description`` is its help text). Problems are reported all at once in one
:class:`ConfigError` whose parts name the settings (``max_length must be >= 16, got 8``), never flags.
Defaults for the learning rate, batch, length and steps were chosen on validation loss of the default
model (README, "Training").
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from lorablocks.errors import ConfigError
from lorablocks.model.models import DEFAULT_MODEL

__all__ = ["Settings", "LoraSettings", "OptimSettings", "TrainConfig", "load_config", "describe_errors", "RUN_ONLY",
           "Precision"]

#: The numeric precision setting; :func:`lorablocks.training.precision.resolve_precision` decides what it means.
Precision = Literal["auto", "fp32", "bf16"]

#: Config-file keys that name a setting by another name.
ALIASES = {"limit": "train_limit"}


class Settings(BaseModel):
    """Base of every config section: unknown keys are errors and assignments are validated.

    Building one from bad values raises pydantic's ``ValidationError``; :func:`load_config` (and the
    study's) turn it into one :class:`ConfigError` with :func:`describe_errors`.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """``true`` is not a rank (pydantic alone would read it as 1)."""
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and {int, float} & {annotation, *typing.get_args(annotation)}:
            raise ValueError("must be a number, not true/false")
        return value


def _comma_list(value: Any) -> Any:
    """``"q_proj,v_proj"`` (a flag or a YAML string) -> ``["q_proj", "v_proj"]``."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


class LoraSettings(Settings):
    """The LoRA of an adapter (the paper's: rank 4, alpha 64, no dropout, the model family's targets)."""

    r: int = Field(4, ge=1, description="LoRA rank.")
    alpha: float = Field(64.0, gt=0, allow_inf_nan=False, description="LoRA alpha; the scale is alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input (0 keeps runs identical across process counts).")
    targets: Optional[list[str]] = Field(None, min_length=1, description="LoRA target modules, comma-separated (default: the model family's preset).")

    @field_validator("targets", mode="before")
    @classmethod
    def _split_targets(cls, value: Any) -> Any:
        return _comma_list(value)


class OptimSettings(Settings):
    """How every step is made: optimizer, batches, example length, data limits, validation size,
    checkpoints. Everything of a training run but its step count and seed (the study sets those per block)."""

    learning_rate: float = Field(1e-3, gt=0, allow_inf_nan=False, description="AdamW peak learning rate.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps, then linear decay to zero at the last step.")
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False, description="AdamW weight decay on the LoRA factors.")
    max_grad_norm: float = Field(1.0, ge=0, allow_inf_nan=False, description="Gradient clipping (global L2 norm); 0: off.")
    batch_size: int = Field(8, ge=1, description="Examples per optimizer step, over all processes.")
    micro_batch_size: int = Field(0, ge=0, description="Examples per forward/backward pass per process (gradient accumulation); 0: the whole share.")
    micro_batch_tokens: int = Field(512, ge=0, description="Padded tokens per forward/backward pass (bounds memory; same result); 0: no bound.")
    max_length: int = Field(256, ge=16, description="Tokens per example (prompt + answer + EOS); longer ones are truncated and counted.")
    bucket_window: int = Field(16, ge=1, description="Batches per length-sorting window of the batch schedule.")
    train_limit: Optional[int] = Field(None, ge=1, description="Use the first N training examples per domain (default: all).")
    val_limit: int = Field(100, ge=0, description="Validation examples per domain (the first N); 0: no validation.")
    checkpoint_every: int = Field(50, ge=0, description="Checkpoint every N steps; 0: none.")
    precision: Precision = Field("auto", description="auto (bf16 autocast where the CPU/GPU has native bf16, else fp32), fp32 or bf16 (fp32 with a warning where not native); LoRA weights and optimizer state stay fp32.")


class TrainConfig(OptimSettings, LoraSettings):
    """Every setting of a training run: :class:`LoraSettings`, :class:`OptimSettings` and the run's own."""

    model: str = Field(DEFAULT_MODEL, description="Base model: smollm2-135m (built in), a local folder or a hub id.")
    data: list[str] = Field(default_factory=list, description="Domain(s): a folder with train/validation/test.jsonl, a .jsonl file or a hub dataset name; several give the merged-data adapter.")
    out: str = Field("", description="Output adapter folder.")
    max_steps: int = Field(200, ge=1, description="Optimizer steps.")
    seed: int = Field(0, description="Seed of the LoRA initialisation, data order and dropout.")
    eval_every: int = Field(50, ge=0, description="Validation loss every N steps (and at the start and end); 0: start and end only.")
    checkpoint_dir: Optional[str] = Field(None, description="Checkpoint folder (default: <out>.checkpoints beside the output).")
    keep_checkpoints: bool = Field(False, description="Keep the last checkpoint after a successful run.")
    resume: bool = Field(False, description="Continue from the latest checkpoint in the checkpoint folder (start afresh if there is none).")
    force: bool = Field(False, description="Replace an existing output folder.")
    cache_dir: Optional[str] = Field(None, description="Cache root for the built-in model (default $LORABLOCKS_CACHE or ~/.cache/lorablocks).")
    statistics: bool = Field(True, description="Write the adapter's input statistics (lorablocks_stats.safetensors: its own training inputs) at the end, for regmean.")
    statistics_tokens: int = Field(4096, ge=1, description="Tokens (the first training examples per domain) the statistics are collected on.")

    @field_validator("data", mode="before")
    @classmethod
    def _split_data(cls, value: Any) -> Any:
        return _comma_list(value)

    def require_complete(self) -> None:
        """Raise :class:`ConfigError` if the config lacks data or an output folder."""
        if _missing(self.data, self.out):
            raise ConfigError("invalid training config: " + "; ".join(_missing(self.data, self.out)))

    @property
    def checkpoint_path(self) -> Path:
        """The checkpoint folder: ``checkpoint_dir``, else ``<out>.checkpoints``."""
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(f"{self.out.rstrip('/')}.checkpoints")


#: Settings that do not change the trained weights (they may differ between a run and its resumption).
RUN_ONLY = frozenset({"out", "resume", "force", "checkpoint_dir", "keep_checkpoints", "cache_dir", "checkpoint_every", "eval_every",
                      "statistics", "statistics_tokens"})


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A complete :class:`TrainConfig` from a YAML/JSON file (optional) with ``overrides`` on top.

    Keys may use dashes or underscores (``learning-rate``); ``limit`` means ``train_limit``; ``None``
    overrides are ignored (a flag that was not given). Every problem is reported in one :class:`ConfigError`.
    """
    values = read_mapping(path) if path else {}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values = {ALIASES.get(k.replace("-", "_"), k.replace("-", "_")): v for k, v in values.items()}
    try:
        cfg = TrainConfig.model_validate(values)
    except ValidationError as exc:
        problems = describe_errors(exc) + _missing(values.get("data"), values.get("out"))
        raise ConfigError("invalid training config: " + "; ".join(problems)) from None
    cfg.require_complete()
    return cfg


def _missing(data: Any, out: Any) -> list[str]:
    """What a run needs and does not have: data and an output folder."""
    return (["data must name at least one domain"] if not data else []) + (["out must name an output folder"] if not out else [])


#: The largest config file read (a config is a few hundred bytes; this bounds what parsing one may cost).
MAX_CONFIG_BYTES = 1 << 20


def _yaml_loader() -> type:
    """PyYAML's safe loader refusing aliases (``*name``): a config never needs them, and a few nested ones
    expand into gigabytes (an alias bomb) before anything could check the result."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, f"aliases (*name) are not allowed in a config "
                                                  f"(line {mark.line + 1})", mark)
            return super().compose_node(parent, index)

    return NoAliasLoader


def read_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping of settings in a YAML (or JSON) file, UTF-8, at most :data:`MAX_CONFIG_BYTES`, without
    aliases; :class:`ConfigError` naming the file if it is missing, unreadable or not one."""
    import yaml

    from lorablocks.files.outputs import note_input

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        with open(p, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"config file {p} cannot be read ({exc.strerror})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {p} is over {MAX_CONFIG_BYTES >> 20} MiB; a config is a short YAML/JSON file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {p} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        loaded = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, RecursionError) as exc:
        first = (str(exc).strip().splitlines() or ["parse error"])[0] if isinstance(exc, yaml.YAMLError) else "nested too deeply"
        raise ConfigError(f"config file {p} is not valid YAML/JSON: {first}") from None
    note_input(p)  # an input of the running command: no output of it may replace it
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p} must hold a mapping of setting: value")
    return {str(k): v for k, v in loaded.items()}


# ------------------------------------------------------------------------------------------- messages

_MUST = {
    "greater_than_equal": "must be >= {ge}", "greater_than": "must be > {gt}", "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}", "int_parsing": "must be an integer", "int_type": "must be an integer",
    "int_from_float": "must be an integer", "float_parsing": "must be a number", "float_type": "must be a number",
    "finite_number": "must be a finite number", "bool_parsing": "must be true or false",
    "bool_type": "must be true or false", "string_type": "must be a string", "list_type": "must be a list",
    "too_short": "must hold at least {min_length} item(s)", "literal_error": "must be {expected}",
}


def _plain(x: Any) -> Any:
    return int(x) if isinstance(x, float) and x.is_integer() else x


def describe_errors(exc: ValidationError, prefix: str = "") -> list[str]:
    """One ``name must be ..., got X`` line per problem, named by setting (``train.max_length`` when nested)."""
    out = []
    for e in exc.errors():
        name = prefix + ".".join(str(p) for p in e["loc"])
        kind, ctx = e["type"], {k: _plain(v) for k, v in (e.get("ctx") or {}).items()}
        if kind == "extra_forbidden":
            out.append(f"unknown setting {name!r}")
        elif kind in _MUST:
            out.append(f"{name} {_MUST[kind].format(**ctx)}, got {e['input']!r}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            out.append(f"{name} {msg}" if msg.startswith("must") else f"{name}: {msg}")
    return out
