"""A loaded base model and the composition merged into its weights, changed in place and exactly.

:class:`ComposedModel` is what evaluation, ``generate`` and ``serve`` share. Applying a composition
computes every touched weight afresh as ``W0 + dW`` from a pristine copy of the original ``W0`` (kept
the first time a module is touched), so after any sequence of changes the weights are bit-identical to
merging the same delta into a freshly loaded model, and removing the composition gives back the base
model bit for bit: nothing drifts through repeated add and subtract. All new weights are computed
before any is written, so a composition that fails (NaN, wrong shape) leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorablocks.compose.recipe import Composition, DeltaSource, Recipe, compose
from lorablocks.core.algebra import LowRank
from lorablocks.errors import BaseModelMismatchError
from lorablocks.model.merge import check_delta_fits, merged_weight, target_weight

__all__ = ["ApplyReport", "ComposedModel", "Prepared"]


@dataclass(frozen=True)
class Prepared:
    """New weights computed for a composition, not yet written into the model."""

    weights: dict[str, torch.Tensor]
    delta: dict[str, LowRank]
    recipe: Recipe | None
    seconds: float


@dataclass(frozen=True)
class ApplyReport:
    """What a change of composition did: modules rewritten and restored, and how long it took."""

    modules_set: int
    modules_restored: int
    seconds: float
    fingerprint: str | None


class ComposedModel:
    """A base model (``nn.Module``) with its tokenizer, its model id and the active composition."""

    def __init__(self, model: nn.Module, tokenizer: Any = None, model_id: str | None = None) -> None:
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.recipe: Recipe | None = None
        self._pristine: dict[str, torch.Tensor] = {}
        self._active: set[str] = set()
        self._delta: dict[str, LowRank] = {}

    @classmethod
    def load(cls, spec: str, cache_dir: str | os.PathLike | None = None, device: str | None = None,
             dtype: torch.dtype | None = None) -> ComposedModel:
        """Load ``--model spec`` (built-in name, local folder or hub id), its weights in ``dtype`` (float32)."""
        from lorablocks.model.models import load_model, model_id

        model, tokenizer = load_model(spec, cache_dir=cache_dir, dtype=dtype, device=device)
        return cls(model, tokenizer, model_id(spec))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's weights (float32 unless loaded otherwise)."""
        return getattr(self.model, "dtype", None) or next(self.model.parameters()).dtype

    @property
    def dtype_tag(self) -> str:
        """``""`` for float32 weights, else ``"@bfloat16"`` (the dtype's name): what fingerprints add for it."""
        return "" if self.dtype == torch.float32 else "@" + str(self.dtype).removeprefix("torch.")

    @property
    def identity(self) -> str | None:
        """The base model as fingerprints name it: its id, with :attr:`dtype_tag` (the same blocks merged into
        bfloat16 weights are other weights)."""
        return self.model_id if not self.dtype_tag else f"{self.model_id or ''}{self.dtype_tag}"

    @property
    def delta(self) -> Mapping[str, LowRank]:
        """The active composition's delta (empty: the base model); a new mapping after every change."""
        return self._delta

    @property
    def fingerprint(self) -> str | None:
        """The active recipe's fingerprint with this base model's :attr:`identity` in it (``None``: the base model)."""
        return self.recipe.fingerprint(base=self.identity) if self.recipe is not None else None

    def check_base_model(self, recorded: Sequence[tuple[str, str | None]]) -> None:
        """Refuse blocks ``(label, recorded base model)`` made for another model (unknown ones pass)."""
        from lorablocks.model.models import same_base_model

        for label, base in recorded:
            if self.model_id is not None and not same_base_model(base, self.model_id):
                raise BaseModelMismatchError(f"{label} was trained on {base}, not {self.model_id}",
                                             setting="allow_base_mismatch")

    def load_blocks(self, files: Sequence[Any], allow_base_mismatch: bool = False) -> list[dict[str, LowRank]]:
        """Read opened adapter files after checking that they fit this model (recorded base model, then every
        module's shape); their deltas, in order."""
        if not allow_base_mismatch:
            self.check_base_model([(str(f.path), f.base_model) for f in files])
        deltas = [f.load().delta for f in files]
        for f, d in zip(files, deltas):
            check_delta_fits(self.model, d, label=str(f.path))
        return deltas

    @torch.no_grad()
    def prepare(self, delta: Mapping[str, LowRank], recipe: Recipe | None = None) -> Prepared:
        """Compute the weights ``W0 + delta`` without touching the model (generations may run meanwhile)."""
        t0 = time.perf_counter()
        check_delta_fits(self.model, delta)
        new: dict[str, torch.Tensor] = {}
        for name, x in delta.items():
            param, transposed = target_weight(self.model, name)
            new[name] = merged_weight(self._pristine.get(name, param), x, transposed, name)
        return Prepared(new, dict(delta), recipe, time.perf_counter() - t0)

    @torch.no_grad()
    def commit(self, prepared: Prepared) -> ApplyReport:
        """Write prepared weights into the model (a copy per module) and restore the modules left behind."""
        t0 = time.perf_counter()
        for name in prepared.weights:
            if name not in self._pristine:
                self._pristine[name] = target_weight(self.model, name)[0].detach().clone()
        restored = self._restore(self._active - set(prepared.weights))
        for name, w in prepared.weights.items():
            target_weight(self.model, name)[0].copy_(w)
        self._active, self.recipe, self._delta = set(prepared.weights), prepared.recipe, prepared.delta
        return ApplyReport(len(prepared.weights), restored, prepared.seconds + time.perf_counter() - t0, self.fingerprint)

    def apply(self, delta: Mapping[str, LowRank], recipe: Recipe | None = None) -> ApplyReport:
        """Make ``W0 + delta`` the model's weights (replacing whatever composition was active)."""
        return self.commit(self.prepare(delta, recipe))

    def apply_recipe(self, recipe: Recipe, sources: Sequence[DeltaSource | Mapping[str, LowRank]]) -> tuple[Composition, ApplyReport]:
        """Compose ``recipe`` from ``sources`` and make it the active composition."""
        composition = compose(recipe, sources)
        return composition, self.apply(composition.delta, composition.recipe)

    @torch.no_grad()
    def clear(self) -> ApplyReport:
        """Back to the base model, bit for bit."""
        t0 = time.perf_counter()
        restored = self._restore(self._active)
        self._active, self.recipe, self._delta = set(), None, {}
        return ApplyReport(0, restored, time.perf_counter() - t0, None)

    def _restore(self, names: set[str]) -> int:
        for name in names:
            target_weight(self.model, name)[0].copy_(self._pristine[name])
        return len(names)

    @contextlib.contextmanager
    def composed(self, delta: Mapping[str, LowRank] | None, recipe: Recipe | None = None) -> Iterator[nn.Module]:
        """Temporarily apply ``delta`` (``None``: the base model); the previous composition comes back after."""
        previous, prev_recipe = self._delta, self.recipe
        try:
            if delta:
                self.apply(delta, recipe)
            else:
                self.clear()
            yield self.model
        finally:
            if previous:
                self.apply(previous, prev_recipe)
            else:
                self.clear()
