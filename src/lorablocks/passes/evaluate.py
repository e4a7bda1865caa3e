"""Per-domain and joint token-weighted perplexity of a base model with a combination merged into it.

``PPL = exp(total NLL of counted tokens / number of counted tokens)`` where counted tokens are the answer
tokens and the EOS (never prompt or padding). The joint perplexity is the same formula over the union of
the domains' examples, taking the same number of examples from each domain (the smallest domain's count,
first examples in order).

For a study that evaluates many combinations on one model, tokenize once with :func:`prepare_eval_set`
and call :func:`evaluate_perplexity` per combination: each call merges the combination's delta into the
weights, runs the bucketed batches and restores the exact original weights.

**Precision.** ``precision="bf16"`` (or ``"auto"`` where the hardware has native bf16, see
:func:`~lorablocks.training.precision.resolve_precision`) runs the model body under bf16 autocast while
the output head, the cross-entropy and (on a CPU) attention stay float32 (:class:`AnswerNLL`,
:meth:`~lorablocks.training.precision.ResolvedPrecision.attention`). Measured against float32 on the
default model (SmolLM2-135M, the first 30 test examples of math and of medicine, max length 512;
``benchmarks/bench_precision.py``): base model math 3.6677 vs 3.6662 (-0.040 %), medicine 10.9679 vs
10.9644 (-0.032 %), joint 7.7498 vs 7.7471 (-0.035 %); with a trained math adapter merged +0.024 %,
-0.001 %, +0.007 %; 1.5x faster (52 s vs 33 s on 2 shared cores). With the head in bf16 as well the bias
was +0.16 / +0.09 / +0.11 %. That is within the 0.5 % the issue allows, so evaluation may use bf16; this
function's default stays ``fp32`` (callers pass their config's setting, whose default is ``auto``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lorablocks.core.algebra import LowRank
from lorablocks.training.data import Domain, TokenizedExample, TokenizedSet, bucket_by_tokens, collate, tokenize_examples
from lorablocks.training.loss import AnswerNLL, answer_nll  # noqa: F401  (answer_nll: imported from here before)
from lorablocks.errors import DataError
from lorablocks.model.merge import check_delta_fits, merged
from lorablocks.training.precision import ResolvedPrecision, resolve_precision

__all__ = [
    "DomainScore",
    "EvalResult",
    "EvalSet",
    "prepare_eval_set",
    "evaluate_perplexity",
    "validation_loss",
    "DEFAULT_EVAL_MAX_LENGTH",
    "DEFAULT_EVAL_BATCH_TOKENS",
]

DEFAULT_EVAL_MAX_LENGTH = 512
DEFAULT_EVAL_BATCH_TOKENS = 4096

@dataclass(frozen=True)
class DomainScore:
    """Summed NLL over ``tokens`` counted tokens of ``examples`` examples."""

    nll: float
    tokens: int
    examples: int
    truncated: int = 0

    @property
    def perplexity(self) -> float:
        """``exp(nll / tokens)``."""
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    @property
    def mean_nll(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")

    def to_dict(self) -> dict[str, float | int]:
        return {
            "perplexity": self.perplexity,
            "nll": self.nll,
            "mean_nll": self.mean_nll,
            "tokens": self.tokens,
            "examples": self.examples,
            "truncated": self.truncated,
        }


@dataclass
class EvalResult:
    """Per-domain scores, the joint score, per-example NLLs (for further analysis), and the precision used
    (:meth:`~lorablocks.training.precision.ResolvedPrecision.to_dict`: setting, used, device, reason)."""

    domains: dict[str, DomainScore]
    joint: DomainScore
    per_example: dict[str, list[tuple[float, int]]] = field(default_factory=dict, repr=False)
    precision: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "domains": {n: s.to_dict() for n, s in self.domains.items()},
            "joint": {**self.joint.to_dict(), "examples_per_domain": self.joint.examples // max(len(self.domains), 1)},
        }


@dataclass
class EvalSet:
    """Tokenized evaluation examples per domain with their length-bucketed batch plan (made once)."""

    sets: dict[str, TokenizedSet]
    split: str
    batch_tokens: int
    #: token id used to right-pad batches (masked out; never counted)
    pad_id: int = 0
    fingerprints: dict[str, str] = field(default_factory=dict)
    #: per domain: lists of example indices, longest batches first
    plans: dict[str, list[list[int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, ts in self.sets.items():
            if name not in self.plans:
                self.plans[name] = bucket_by_tokens([len(e) for e in ts.examples], self.batch_tokens)


def prepare_eval_set(
    tokenizer: Any,
    domains: Sequence[Domain] | Mapping[str, Sequence[Any]],
    split: str = "test",
    limit: int | None = None,
    max_length: int = DEFAULT_EVAL_MAX_LENGTH,
    batch_tokens: int = DEFAULT_EVAL_BATCH_TOKENS,
) -> EvalSet:
    """Load and tokenize each domain's ``split`` once (``domains`` may also map names to Example lists)."""
    if batch_tokens < max_length:
        raise DataError(f"batch_tokens ({batch_tokens}) must be at least max_length ({max_length}): a batch holds "
                        "at least one example", setting="batch_tokens")
    sets: dict[str, TokenizedSet] = {}
    prints: dict[str, str] = {}
    if isinstance(domains, Mapping):
        items = [(name, list(exs)[:limit] if limit else list(exs)) for name, exs in domains.items()]
    else:
        items = []
        for d in domains:
            items.append((d.name, d.load(split, limit)))
            prints[d.name] = d.fingerprint(split)
    for name, examples in items:
        if not examples:
            raise DataError(f"domain {name} has no {split} examples")
        sets[name] = tokenize_examples(tokenizer, examples, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return EvalSet(sets=sets, split=split, batch_tokens=batch_tokens, pad_id=int(pad), fingerprints=prints)


@torch.no_grad()
def _score(model: nn.Module, eval_set: EvalSet, precision: ResolvedPrecision) -> dict[str, list[tuple[float, int]]]:
    device = next(model.parameters()).device
    loss = AnswerNLL(model)
    pad = eval_set.pad_id
    out: dict[str, list[tuple[float, int]]] = {}
    for name, ts in eval_set.sets.items():
        per: list[tuple[float, int]] = [(0.0, 0)] * len(ts.examples)
        for idx in eval_set.plans[name]:
            batch = collate([ts.examples[i] for i in idx], pad).to(device)
            with precision.autocast():
                nll, cnt = loss(batch.input_ids, batch.attention_mask, batch.target_mask)
            for i, v, c in zip(idx, nll.double().tolist(), cnt.tolist()):
                per[i] = (v, int(c))
        out[name] = per
    return out


def _aggregate(per_example: dict[str, list[tuple[float, int]]], eval_set: EvalSet) -> EvalResult:
    domains = {
        name: DomainScore(
            nll=math.fsum(v for v, _ in per), tokens=sum(c for _, c in per), examples=len(per),
            truncated=eval_set.sets[name].truncated,
        )
        for name, per in per_example.items()
    }
    m = min(len(per) for per in per_example.values())
    joint_rows = [row for per in per_example.values() for row in per[:m]]
    joint = DomainScore(
        nll=math.fsum(v for v, _ in joint_rows), tokens=sum(c for _, c in joint_rows), examples=len(joint_rows),
        truncated=sum(ts.examples[i].truncated for ts in eval_set.sets.values() for i in range(m)),
    )
    return EvalResult(domains=domains, joint=joint, per_example=per_example)


def evaluate_perplexity(
    model: nn.Module,
    eval_set: EvalSet,
    delta: Mapping[str, LowRank] | None = None,
    precision: str | ResolvedPrecision = "fp32",
) -> EvalResult:
    """Perplexity per domain and joint of ``model`` with ``delta`` merged into its weights.

    ``delta`` (e.g. ``algebra.add([a.delta for a in adapters], weights)``) is checked against the model's
    module shapes first, merged for the duration of the call and then the exact original weights are
    restored, so one loaded model serves any number of combinations. ``delta=None`` scores the model as is.
    ``precision`` (``auto``, ``fp32``, ``bf16``, or a resolved one) is the model body's; the output head
    and the NLL are float32 either way (module docstring: bf16 agrees with fp32 to 0.01 %).
    """
    if not isinstance(precision, ResolvedPrecision):
        precision = resolve_precision(precision, next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with precision.attention(model):
            if delta:
                check_delta_fits(model, delta)
                with merged(model, delta):
                    per = _score(model, eval_set, precision)
            else:
                per = _score(model, eval_set, precision)
    finally:
        model.train(was_training)
    result = _aggregate(per, eval_set)
    result.precision = precision.to_dict()
    return result


def validation_loss(loss_mod: AnswerNLL, val: Sequence[Sequence[TokenizedExample]], pad: int, batch_tokens: int,
                    accelerator: Any, precision: ResolvedPrecision) -> list[tuple[float, int]]:
    """Summed NLL and counted tokens per domain, sharded over processes and reduced, in the run's precision
    (bf16 moves the NLL by about 0.01 %, see above). Used by training's periodic validation."""
    model = loss_mod.model
    was = model.training
    model.eval()
    device = accelerator.device
    sums = torch.zeros(len(val), 2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for k, exs in enumerate(val):
            plan = bucket_by_tokens([len(e) for e in exs], batch_tokens)
            for idx in plan[accelerator.process_index :: accelerator.num_processes]:
                b = collate([exs[i] for i in idx], pad).to(device)
                with precision.autocast():
                    nll, cnt = loss_mod(b.input_ids, b.attention_mask, b.target_mask)
                sums[k, 0] += nll.double().sum()
                sums[k, 1] += cnt.sum()
    model.train(was)
    sums = accelerator.reduce(sums, reduction="sum")
    return [(float(s), int(c)) for s, c in sums.tolist()]
