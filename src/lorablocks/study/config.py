"""The study's config: sections, presets, loading (preset, then YAML file, then overrides), subsets.

The ``lora`` section *is* the training's :class:`~lorablocks.training.config.LoraSettings`, and the
``train`` section is its :class:`~lorablocks.training.config.OptimSettings` (same fields, bounds, defaults
and help, ``precision`` included) with ``steps_per_domain`` in place of a step count; each block's
:class:`~lorablocks.training.config.TrainConfig` is built from the two. ``eval.precision`` is the
evaluation's own (see :mod:`lorablocks.passes.evaluate` for the measured agreement with fp32).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any, Literal, Optional, Union

from pydantic import Field, ValidationError, field_validator

from lorablocks.errors import ConfigError
from lorablocks.training.config import (LoraSettings, OptimSettings, Precision, Settings, TrainConfig, describe_errors,
                                       read_mapping)

__all__ = [
    "LoraSettings",
    "TrainSettings",
    "EvalSettings",
    "StudyConfig",
    "SubsetSpec",
    "MethodSpec",
    "AnalysisSettings",
    "PRESETS",
    "load_config",
    "plan_subsets",
]


class TrainSettings(OptimSettings):
    """Training of each block: the training recipe, and ``steps_per_domain`` optimizer steps per domain
    (a merged-data adapter of k domains gets k times as many, or with ``merged_updates: same`` as many at k times
    the batch; its warm-up is capped at half its steps)."""

    steps_per_domain: int = Field(TrainConfig.model_fields["max_steps"].default, ge=1,
                                  description="Optimizer steps per domain of a block.")
    merged_updates: Literal["per_domain", "same"] = Field("per_domain", description=(
        "A merged-data adapter of k domains: per_domain gets k x steps_per_domain steps of batch_size (the paper: the "
        "same steps per domain); same gets steps_per_domain steps of k x batch_size (the same examples per domain and "
        "the same number of optimizer updates as a single block)."))

    def block_steps(self, k: int) -> tuple[int, int]:
        """``(optimizer steps, batch size)`` of a block trained on ``k`` domains."""
        if k > 1 and self.merged_updates == "same":
            return self.steps_per_domain, self.batch_size * k
        return self.steps_per_domain * k, self.batch_size


class EvalSettings(Settings):
    """Held-out evaluation."""

    split: Literal["test", "validation"] = Field("test", description="Split to evaluate on.")
    limit: Optional[int] = Field(200, ge=1, description="Examples per domain (first N, deterministic); null: all.")
    max_length: int = Field(512, ge=16, description="Tokens per example; longer ones are truncated (counted).")
    singles_on_all: bool = Field(True, description="Score each single block on every domain (False: on its own).")
    precision: Precision = Field(TrainConfig.model_fields["precision"].default, description=(
        "Precision of the model body: auto (bf16 where the CPU/GPU has it natively), fp32 or bf16; the output "
        "head and the NLL stay fp32 (bf16 agrees with fp32 to 0.01 % in perplexity on the default model)."))


class MethodSpec(Settings):
    """A composition method evaluated on every subset beside the naive sum (see ``lorablocks.compose.methods``).

    ``params`` are the method's parameters; for ``learned`` they are its fitting settings (``steps``,
    ``limit``, ``learning_rate``), and the weights are fitted per subset on validation examples.
    """

    name: str = Field(description="Method name, e.g. ties, dare_ties, tsv, knots, learned.")
    params: dict[str, Any] = Field(default_factory=dict, description="The method's parameters.")

    @property
    def label(self) -> str:
        """``ties`` or ``ties(density=0.3)``: how tables and results name it."""
        inner = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.name}({inner})" if inner else self.name


class AnalysisSettings(Settings):
    """Uncertainty and predictors."""

    bootstrap_resamples: int = Field(10_000, ge=200, description="Paired-bootstrap resamples per interval.")
    bootstrap_seed: int = Field(0, description="Seed of every bootstrap and permutation.")
    probe_limit: int = Field(16, ge=0, description="Validation examples per domain probed for function overlap (0: off).")
    near_pairs: list[list[str]] = Field([["medicine", "biomed"]], description="Domain pairs that overlap on purpose.")


SubsetSpec = Union[Literal["pairs_and_all", "pairs", "all", "none"], list[list[str]]]


class StudyConfig(Settings):
    """Everything the study depends on. YAML is only a serialisation of this."""

    model: str = Field(TrainConfig.model_fields["model"].default, description=TrainConfig.model_fields["model"].description)
    domains: list[str] = Field(["math", "medicine", "finance"], description="Domain folders (names under the data folder, or paths).")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    merged_subsets: SubsetSpec = Field("pairs_and_all", description="Subsets that get a merged-data adapter.")
    max_sum_size: Optional[int] = Field(None, ge=2, description="Largest sum evaluated (default: all domains).")
    seeds: list[int] = Field([0], min_length=1, description="Training seeds; results report mean and spread.")
    methods: list[MethodSpec] = Field(default_factory=list, description="Composition methods evaluated beside the naive sum.")
    methods_max_size: Optional[int] = Field(None, ge=2, description="Largest subset the methods are evaluated on (default: every sum).")
    analysis: AnalysisSettings = Field(default_factory=AnalysisSettings)

    @field_validator("domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        if len(v) < 2:
            raise ValueError("must hold at least two domains (the study combines them)")
        if len(set(v)) != len(v):
            raise ValueError("must be distinct")
        return v


PRESETS: dict[str, dict[str, Any]] = {
    # The whole pipeline in minutes, for checking (numbers are not meaningful).
    "smoke": {
        "domains": ["math", "medicine", "finance"],
        "train": {"steps_per_domain": 3, "batch_size": 4, "max_length": 96, "train_limit": 64, "val_limit": 4},
        "eval": {"limit": 8, "max_length": 128},
        "methods": [{"name": "ties", "params": {"density": 0.5}}],
        "methods_max_size": 2,
        "analysis": {"bootstrap_resamples": 2000, "probe_limit": 4},
        "seeds": [0],
    },
    # The README's main command, about 40 minutes on 2 shared CPU cores (19 before regmean joined). Four domains (with the near pair
    # medicine/biomed) give 28 fine points (3 domains give 9); a sum is scored only on its own domains, the base
    # model and the singles on all; merged-data adapters for the 6 pairs (the paper's level), none for larger
    # subsets (each costs k times the steps); regmean beside every sum (statistics from each block's training
    # inputs, so the test split stays unseen).
    "quick": {
        "domains": ["math", "medicine", "biomed", "finance"],
        "merged_subsets": "pairs",
        "methods": [{"name": "regmean", "params": {"alpha": 0.9}}],
        "train": {"steps_per_domain": 8, "batch_size": 8, "max_length": 128, "val_limit": 8},
        "eval": {"limit": 16, "max_length": 192},
        "analysis": {"probe_limit": 8},
        "seeds": [0],
    },
    # All five domains in about 70 minutes on 2 shared CPU cores (measured with one torch thread while other
    # work ran): 75 fine points, 10 paper-level points, 50 test examples per domain. Evaluation dominates
    # (about 6,500 scored examples; singles only on their own domain), so training gets what is left: 12 steps
    # per domain (bf16).
    "standard": {
        "domains": ["math", "medicine", "biomed", "finance", "code"],
        "merged_subsets": "pairs",
        "methods": [{"name": "regmean", "params": {"alpha": 0.9}}],
        "train": {"steps_per_domain": 12, "batch_size": 8, "max_length": 128, "val_limit": 16},
        "eval": {"limit": 50, "max_length": 192, "singles_on_all": False},
        "analysis": {"probe_limit": 16},
        "seeds": [0],
    },
    # The paper's scale (for a GPU): three seeds, longer training, larger held-out sets.
    "paper": {
        "domains": ["math", "medicine", "finance"],
        "train": {"steps_per_domain": 300, "batch_size": 8, "max_length": 256},
        "eval": {"limit": 500, "max_length": 512},
        "seeds": [0, 1, 2],
    },
}


def _deep_update(base: dict, new: dict) -> dict:
    out = dict(base)
    for k, v in new.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | os.PathLike | None = None, preset: str | None = None,
                overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Preset, then YAML file, then overrides; every problem is reported at once as a :class:`ConfigError`."""
    raw: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        raw = _deep_update(raw, PRESETS[preset])
    if path is not None:
        raw = _deep_update(raw, read_mapping(path))
    raw = _deep_update(raw, overrides or {})
    try:
        cfg = StudyConfig.model_validate(raw)
    except ValidationError as exc:
        problems = describe_errors(exc)
        raise ConfigError(f"{len(problems)} problem(s) in the study config: " + "; ".join(problems)) from None
    problems = _method_problems(cfg.methods) + _leakage_problems(cfg)
    if isinstance(cfg.merged_subsets, list):
        for s in cfg.merged_subsets:
            unknown = [d for d in s if d not in cfg.domains]
            if unknown:
                problems.append(f"merged_subsets: {unknown} not among domains {cfg.domains}")
            if len(s) < 2:
                problems.append(f"merged_subsets: {s} has fewer than two domains")
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in the study config: " + "; ".join(problems))
    return cfg


#: Methods that fit something on the domains' validation examples (regmean's statistics come from each
#: block's training inputs, so it is not one of them).
DATA_DRIVEN_METHODS = ("learned",)


def _leakage_problems(cfg: StudyConfig) -> list[str]:
    """Scoring on the validation split while probes or data-driven methods fit on it would leak."""
    users = (["the function-overlap probe (analysis.probe_limit > 0)"] if cfg.analysis.probe_limit else []) + \
        [f"method {m.name}" for m in cfg.methods if m.name in DATA_DRIVEN_METHODS]
    if cfg.eval.split != "validation" or not users:
        return []
    return [f"eval.split: validation is refused while {' and '.join(users)} fit on validation examples "
            "(they would be scored on the examples they were fitted on); use eval.split: test"]


def _method_problems(methods: Sequence[MethodSpec]) -> list[str]:
    """Every method that does not exist or whose parameters it does not take."""
    from lorablocks.compose.methods import get_method, validate_params
    from lorablocks.errors import LoraBlocksError

    problems = []
    for i, spec in enumerate(methods):
        try:
            method = get_method(spec.name)
            if spec.name == "learned":
                from lorablocks.training.learned import LearnSettings

                LearnSettings(**spec.params)
            elif spec.name != "sum":
                validate_params(method, spec.params)
            else:
                problems.append(f"methods.{i}: sum is always evaluated (it is the baseline); do not list it")
        except LoraBlocksError as exc:
            problems.append(f"methods.{i}: {exc}")
        except TypeError as exc:
            problems.append(f"methods.{i}: learned: {exc}")
    return problems


def plan_subsets(domains: Sequence[str], max_size: int | None, merged: SubsetSpec) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """All subsets of size 2..max_size (the sums), and the subsets that get a merged-data adapter."""
    n = len(domains)
    top = n if max_size is None else min(max_size, n)
    sums = [s for k in range(2, top + 1) for s in itertools.combinations(domains, k)]
    if merged == "pairs_and_all":
        merged_sets = [s for s in sums if len(s) == 2] + ([tuple(domains)] if n > 2 else [])
    elif merged == "pairs":
        merged_sets = [s for s in sums if len(s) == 2]
    elif merged == "all":
        merged_sets = [tuple(domains)]
    elif merged == "none":
        merged_sets = []
    else:
        merged_sets = [tuple(d for d in domains if d in s) for s in merged]
    return sums, merged_sets
