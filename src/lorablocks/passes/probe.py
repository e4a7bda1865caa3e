"""Probing function overlap on a loaded base model: a few validation examples of each block's domain.

:func:`probe_function_overlap` tokenizes the first ``limit`` examples of each domain's ``split``, runs the
base model over them once per domain with hooks that project every target module's inputs onto the
blocks' stacked ``A`` factors, and returns :class:`~lorablocks.core.function_overlap.FunctionOverlap`.
Only the positions that predict answer tokens are counted (what perplexity counts); the prompt still
shapes them through attention.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lorablocks.core.algebra import LowRank
from lorablocks.core.function_overlap import FunctionOverlap, function_overlap
from lorablocks.passes.activations import projected_grams
from lorablocks.training.data import Domain, bucket_by_tokens, collate, tokenize_examples

__all__ = ["probe_function_overlap", "DEFAULT_PROBE_LIMIT"]

#: examples per domain: enough tokens (thousands) for stable Grams of rank-4 projections
DEFAULT_PROBE_LIMIT = 16


def _batches(model: nn.Module, tokenizer: Any, domain: Domain, split: str, limit: int,
             max_length: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    ts = tokenize_examples(tokenizer, domain.load(split, limit), max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    for idx in bucket_by_tokens([len(e) for e in ts.examples], 4096):
        b = collate([ts.examples[i] for i in idx], int(pad)).to(device)
        yield b.input_ids, b.attention_mask, b.target_mask


def probe_function_overlap(model: nn.Module, tokenizer: Any, deltas: Sequence[Mapping[str, LowRank]],
                           domains: Sequence[Domain], *, split: str = "validation",
                           limit: int = DEFAULT_PROBE_LIMIT, max_length: int = 256) -> FunctionOverlap:
    """Interference ``I(j -> i)`` and functional cosines of ``deltas[i]`` probed on ``domains[i]``'s inputs.

    ``model`` must be the base model (no composition applied): the inputs are the base model's.
    """
    if len(domains) != len(deltas):
        from lorablocks.errors import ConfigError

        raise ConfigError(f"{len(domains)} probe domains for {len(deltas)} adapters: give one domain per adapter, "
                          "in the same order", setting="probe_data")
    grams = [projected_grams(model, _batches(model, tokenizer, d, split, limit, max_length), deltas) for d in domains]
    return function_overlap(deltas, grams)


def probe_adapters(paths: Sequence[str], model: str, data: Sequence[str], *, limit: int = DEFAULT_PROBE_LIMIT,
                   split: str = "validation", cache_dir: str | None = None,
                   allow_base_mismatch: bool = False) -> dict[str, Any]:
    """The function-overlap matrices of adapter folders, probed on one domain per adapter (for ``similarity``)."""
    from lorablocks.compose.operations import open_blocks
    from lorablocks.model.session import ComposedModel
    from lorablocks.training.data import resolve_domains

    files = open_blocks(paths, allow_base_mismatch=allow_base_mismatch)
    domains = resolve_domains(data)
    if len(domains) != len(files):
        from lorablocks.errors import ConfigError

        raise ConfigError(f"{len(domains)} probe domains for {len(files)} adapters: give one domain per adapter, "
                          "in the same order", setting="probe_data")
    session = ComposedModel.load(model, cache_dir=cache_dir)
    deltas = session.load_blocks(files, allow_base_mismatch)
    fo = probe_function_overlap(session.model, session.tokenizer, deltas, domains, split=split, limit=limit)
    return {"probe_domains": [d.name for d in domains], "split": split, "examples_per_domain": limit,
            "interference": fo.interference, "functional_cosine": fo.cosine}
