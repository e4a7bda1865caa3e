"""Fit the ``learned`` method's weights: one per block and per layer, by gradient descent, model frozen.

CAT / LoRA Soups (arXiv 2410.13025): ``dW^l = sum_i alpha_i^l dW_i^l``, ``alpha`` started at the user's
weights. The blocks act through forward hooks in unmerged form, ``y += sum_i alpha_i^l B_i (A_i x)``, so
the gradient reaches ``alpha`` only; every model weight stays frozen. The examples (the first ``limit`` of
each domain's validation split) are split into a fitting part and a held-out part (every fourth example);
the held-out answer NLL decides: the weights with the lowest held-out loss are returned, and if no step
beats the start, the start is returned and the result says so.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lorablocks.compose.methods.learned import layer_of
from lorablocks.compose.recipe import Recipe, make_recipe
from lorablocks.core.algebra import LowRank
from lorablocks.training.data import Domain, TokenizedExample, bucket_by_tokens, collate, tokenize_examples
from lorablocks.passes.evaluate import AnswerNLL

__all__ = ["LearnSettings", "LearnedFit", "fit_layer_weights"]


@dataclass(frozen=True)
class LearnSettings:
    """How the weights are fitted."""

    #: optimizer steps (each a full pass over the fitting examples)
    steps: int = 20
    #: examples per domain (validation split); a quarter is held out
    limit: int = 16
    #: Adam learning rate on the weights
    learning_rate: float = 0.05
    #: stop after this many held-out checks without improvement
    patience: int = 4
    max_length: int = 256
    split: str = "validation"


@dataclass
class LearnedFit:
    """The fitted recipe, the losses that chose it, and whether it beat the start."""

    recipe: Recipe
    layer_weights: dict[str, list[float]]
    heldout_start: float
    heldout_best: float
    improved: bool
    best_step: int
    steps_run: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)

    def record(self) -> dict:
        return {"heldout_loss_start": self.heldout_start, "heldout_loss_best": self.heldout_best,
                "improved": self.improved, "best_step": self.best_step, "steps_run": self.steps_run,
                "seconds": self.seconds, "history": self.history,
                "note": None if self.improved else "no step beat the start on the held-out examples: start returned"}


def _examples(tokenizer, domains: Sequence[Domain], s: LearnSettings) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    fit, held = [], []
    for d in domains:
        exs = tokenize_examples(tokenizer, d.load(s.split, s.limit), s.max_length).examples
        held += exs[3::4] if len(exs) > 1 else []
        fit += [e for k, e in enumerate(exs) if k % 4 != 3 or len(exs) == 1]
    return fit, held


@contextlib.contextmanager
def _hooked(model: nn.Module, deltas: Sequence[Mapping[str, LowRank]], alpha: torch.Tensor,
            layers: list[str]) -> Iterator[None]:
    """Add ``sum_i alpha[i, layer] B_i (A_i x)`` to each touched module's output while inside."""
    handles = []
    for name in dict.fromkeys(m for d in deltas for m in d):
        col = layers.index(layer_of(name))
        parts = [(i, d[name]) for i, d in enumerate(deltas) if name in d]

        def hook(_mod, args, out, parts=parts, col=col):
            x = args[0]
            extra = sum(alpha[i, col] * ((x @ p.A.to(x.dtype).T) @ p.B.to(x.dtype).T) for i, p in parts)
            return out + extra
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _loss(loss_mod: AnswerNLL, exs: Sequence[TokenizedExample], pad: int, grad: bool) -> torch.Tensor:
    """Token-weighted mean answer NLL over ``exs`` (backward per micro-batch when ``grad``)."""
    total_tokens = max(sum(e.n_answer for e in exs), 1)
    device = next(loss_mod.parameters()).device
    value = torch.zeros((), dtype=torch.float64)
    for idx in bucket_by_tokens([len(e) for e in exs], 2048):
        b = collate([exs[i] for i in idx], pad).to(device)
        with torch.set_grad_enabled(grad):
            nll, _ = loss_mod(b.input_ids, b.attention_mask, b.target_mask)
            part = nll.sum() / total_tokens
            if grad:
                part.backward()
        value += float(part.detach())
    return value


def fit_layer_weights(model: nn.Module, tokenizer, template: Recipe, deltas: Sequence[Mapping[str, LowRank]],
                      domains: Sequence[Domain], settings: LearnSettings = LearnSettings(),
                      log: Callable[[str], None] | None = None) -> LearnedFit:
    """Fit ``alpha[i, layer]`` from the blocks' weights on ``domains``; return ``template`` (a ``learned``
    recipe) with the weights of the best held-out loss."""
    t0 = time.perf_counter()
    blocks = template.blocks
    fit_exs, held_exs = _examples(tokenizer, domains, settings)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    layers = sorted({layer_of(m) for d in deltas for m in d}, key=lambda k: (k == "other", int(k) if k.isdigit() else 0))
    start = torch.tensor([[b.weight] * len(layers) for b in blocks], dtype=torch.float32)
    alpha = start.clone().requires_grad_(True)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    was = model.training
    model.eval()  # no dropout: the held-out loss must be a deterministic function of alpha
    loss_mod = AnswerNLL(model)
    opt = torch.optim.Adam([alpha], lr=settings.learning_rate)
    history: list[dict[str, float]] = []
    try:
        with _hooked(model, deltas, alpha, layers):
            start_loss = best_loss = float(_loss(loss_mod, held_exs or fit_exs, pad, grad=False))
            best, best_step, stale, step = start.clone(), 0, 0, 0
            for step in range(1, settings.steps + 1):
                opt.zero_grad(set_to_none=True)
                train_loss = float(_loss(loss_mod, fit_exs, pad, grad=True))
                opt.step()
                held = float(_loss(loss_mod, held_exs or fit_exs, pad, grad=False))
                history.append({"step": step, "fit_loss": train_loss, "heldout_loss": held})
                if log:
                    log(f"learned weights: step {step}/{settings.steps}, fit loss {train_loss:.4f}, held-out {held:.4f}")
                if held < best_loss - 1e-9:
                    best, best_loss, best_step, stale = alpha.detach().clone(), held, step, 0
                else:
                    stale += 1
                    if stale >= settings.patience:
                        break
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was)
    weights = {layer: [float(best[i, c]) for i in range(len(blocks))] for c, layer in enumerate(layers)}
    recipe = template.model_copy(update={"params": {"layer_weights": weights}})
    return LearnedFit(recipe=recipe, layer_weights=weights, heldout_start=start_loss, heldout_best=best_loss,
                      improved=best_step > 0, best_step=best_step, steps_run=step, seconds=time.perf_counter() - t0,
                      history=history)


def combine_learned(paths: Sequence[str], out: str, *, data: Sequence[str], model: str, weights: Sequence[float] | None = None,
                    rank: str | int = "minimal", rtol: float = 1e-6, settings: LearnSettings = LearnSettings(),
                    allow_base_mismatch: bool = False, cache_dir: str | None = None, force: bool = False,
                    log: Callable[[str], None] | None = None):
    """``combine --method learned``: validate, load the model, fit the layer weights, write the adapter whose
    record holds the fitted weights and the held-out loss before and after."""
    from lorablocks.compose.operations import blocks_of, open_blocks, write_composition
    from lorablocks.errors import ConfigError
    from lorablocks.files.outputs import check_output_free
    from lorablocks.model.session import ComposedModel
    from lorablocks.training.data import resolve_domains

    if not data:
        raise ConfigError("the learned method needs data: a few examples of each block's domain", setting="data")
    if settings.steps < 1 or settings.limit < 2:
        raise ConfigError("the learned method needs steps >= 1 and limit >= 2", setting="steps")
    check_output_free(out, force, kind="adapter", inputs=list(paths))
    domains = resolve_domains(data)
    files = open_blocks(paths, allow_base_mismatch=allow_base_mismatch)
    template = make_recipe(blocks_of(files, weights), method="learned", rank=rank, rtol=rtol)
    session = ComposedModel.load(model, cache_dir=cache_dir)
    deltas = session.load_blocks(files, allow_base_mismatch)
    fit = fit_layer_weights(session.model, session.tokenizer, template, deltas, domains, settings, log)
    composition = write_composition(fit.recipe, files, out, extra_record={"learned": fit.record()}, force=force)
    return composition, fit
