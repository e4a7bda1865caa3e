"""Collecting a block's input statistics: the Grams a ``regmean`` composition needs.

:func:`collect_grams` runs a model over tokenized examples with :func:`~lorablocks.passes.hooks.hooked_pass`
and accumulates, per input site, ``sum x x^T`` over every non-padding token (prompt and answer) in float64,
divided by the token count at the end (token *means*: blocks whose statistics saw more tokens do not weigh
more). The model is the block's own model (the base model with the block applied), as in RegMean: each
module's Gram is of the inputs it sees in the fine-tuned model. Widths above
:data:`~lorablocks.files.statistics.DENSE_MAX` are kept as a top-``k`` eigen sketch plus the exact diagonal.

:func:`block_statistics` is what ``lorablocks stats``, ``train`` and ``combine --data`` use: a domain's first
examples of a split, bounded by a token budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lorablocks.core.regmean import InputGram, sketch
from lorablocks.files.statistics import DENSE_MAX, SKETCH_RANK, BlockStatistics, StatsSite
from lorablocks.passes.hooks import hooked_pass, token_batches
from lorablocks.training.data import Domain, TokenizedExample, tokenize_examples

__all__ = ["StatsSettings", "CollectedGrams", "collect_grams", "budgeted", "block_statistics", "DEFAULT_STATS_TOKENS"]

#: tokens per block by default (a few dozen examples): what RegMean needs with alpha < 1, at a fraction of training's cost
DEFAULT_STATS_TOKENS = 4096


@dataclass(frozen=True)
class StatsSettings:
    """Which examples feed the statistics and how wide Grams are stored."""

    split: str = "train"
    limit: int | None = None
    max_tokens: int = DEFAULT_STATS_TOKENS
    max_length: int = 256
    dense_max: int = DENSE_MAX
    sketch_rank: int = SKETCH_RANK


@dataclass
class CollectedGrams:
    """Per input site its token-mean Gram, the modules it feeds, and the tokens seen."""

    grams: dict[str, InputGram] = field(default_factory=dict)
    modules: dict[str, list[str]] = field(default_factory=dict)
    tokens: int = 0
    #: what the statistics came from (domain, split, examples, tokens; see :func:`describe`)
    data: dict[str, Any] = field(default_factory=dict)

    def statistics(self, base_model: str | None) -> BlockStatistics:
        """In-memory :class:`BlockStatistics` (nothing written)."""
        sites = {s: StatsSite(tuple(self.modules[s]), g.size, g.tokens, "sketch" if g.is_sketch else "full")
                 for s, g in self.grams.items()}
        return BlockStatistics(sites=sites, base_model=base_model, data=dict(self.data),
                               grams=dict(self.grams))


def budgeted(examples: Sequence[TokenizedExample], max_tokens: int) -> list[TokenizedExample]:
    """The first examples whose tokens add up to at most ``max_tokens`` (always at least one)."""
    out, total = [], 0
    for e in examples:
        if out and total + len(e) > max_tokens:
            break
        out.append(e)
        total += len(e)
    return out


@torch.no_grad()
def collect_grams(model: nn.Module, modules: Sequence[str], examples: Sequence[TokenizedExample], pad: int, *,
                  dense_max: int = DENSE_MAX, sketch_rank: int = SKETCH_RANK, batch_tokens: int = 4096) -> CollectedGrams:
    """Token-mean input Grams of ``modules`` over ``examples`` (module docstring)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def add(_name: str, site: str, x: torch.Tensor) -> None:
        x = x.to(torch.float32)
        g = (x.T @ x).to(torch.float64).cpu()
        sums[site] = sums[site] + g if site in sums else g
        counts[site] = counts.get(site, 0) + int(x.shape[0])

    seen = hooked_pass(model, modules, token_batches(model, examples, pad, batch_tokens), add, per_site=True)
    out = CollectedGrams(tokens=seen.tokens)
    for name in modules:
        out.modules.setdefault(seen.sites.get(name, name), []).append(name)
    for site, total in sums.items():
        mean = total / max(counts[site], 1)
        n = counts[site]
        out.grams[site] = (InputGram.exact(mean.to(torch.float32), n) if mean.shape[0] <= dense_max
                           else sketch(mean, sketch_rank, n))
    return out


def block_statistics(model: nn.Module, tokenizer: Any, modules: Sequence[str], domain: Domain,
                     settings: StatsSettings, base_model: str | None,
                     adapter_sha256: str | None = None) -> CollectedGrams:
    """The statistics of ``modules`` on ``domain``'s first examples of ``settings.split`` (``model``: the
    block's own model), with what they came from in ``.data``."""
    raw = domain.load(settings.split, settings.limit)
    ts = tokenize_examples(tokenizer, raw, settings.max_length)
    exs = budgeted(ts.examples, settings.max_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collected = collect_grams(model, modules, exs, int(pad), dense_max=settings.dense_max,
                              sketch_rank=settings.sketch_rank)
    collected.data = describe(domain, settings, len(exs), collected.tokens, adapter_sha256)
    return collected


def describe(domain: Domain, settings: StatsSettings, examples: int, tokens: int,
             adapter_sha256: str | None) -> dict[str, Any]:
    """What a statistics file records about its data."""
    return {"domain": domain.name, "source": domain.source, "split": settings.split,
            "split_sha256": domain.fingerprint(settings.split), "examples": examples, "tokens": tokens,
            "max_length": settings.max_length, "max_tokens": settings.max_tokens, "adapter_sha256": adapter_sha256,
            "model": "the block's own (base + block)"}
