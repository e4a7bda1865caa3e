"""The one hooked pass over a domain's examples that probes and statistics share.

:func:`token_batches` turns tokenized examples into padded ``(input_ids, attention_mask)`` batches (by
length, at most ``batch_tokens`` padded tokens each); :func:`hooked_pass` runs the model over them with a
forward pre-hook on each named module that hands ``on_input(module, site, x)`` the module's input at
non-padding (or the caller's counted) positions (``x``: ``tokens x in``). Modules fed the very same tensor one after another (``q/k/v``
or ``gate/up`` in Llama) share an input *site*, named by the first of them; with ``per_site`` only that
first module's hook calls ``on_input``. The output head runs on one position only (``logits_to_keep=1``)
unless it is hooked itself: nothing reads the logits, and Gemma's 262,144-token vocabulary made them 4 GB
per 4,096-token batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lorablocks.training.data import TokenizedExample, bucket_by_tokens, collate

__all__ = ["token_batches", "hooked_pass", "PassResult"]

OnInput = Callable[[str, str, torch.Tensor], None]


def token_batches(model: nn.Module, examples: Sequence[TokenizedExample], pad: int,
                  batch_tokens: int = 4096) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Padded batches of ``examples`` on the model's device."""
    device = next(model.parameters()).device
    for idx in bucket_by_tokens([len(e) for e in examples], batch_tokens):
        b = collate([examples[i] for i in idx], int(pad)).to(device)
        yield b.input_ids, b.attention_mask


@dataclass
class PassResult:
    """What a hooked pass saw: non-padding tokens, and each module's input site."""

    tokens: int = 0
    sites: dict[str, str] = field(default_factory=dict)


@torch.no_grad()
def hooked_pass(model: nn.Module, modules: Sequence[str], batches: Iterable[tuple[torch.Tensor, ...]],
                on_input: OnInput, *, per_site: bool = False) -> PassResult:
    """Run ``model`` (in eval mode, restored after) over ``batches`` with input hooks on ``modules``.

    ``batches`` yield ``(input_ids, attention_mask)`` (every non-padding position handed on) or
    ``(input_ids, attention_mask, counted)`` (only the positions of the boolean mask ``counted``)."""
    result = PassResult()
    state: dict = {"mask": None, "last": None, "last_site": None}

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            site = state["last_site"] if x is state["last"] else name
            state["last"], state["last_site"] = x, site
            result.sites.setdefault(name, site)
            if per_site and site != name:
                return
            keep = state["mask"].reshape(-1).bool()
            on_input(name, site, x.reshape(-1, x.shape[-1])[keep])
        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(hook_for(name)) for name in modules]
    extra = _head_on_one_position(model, modules)
    was = model.training
    try:
        model.eval()
        for input_ids, attention_mask, *counted in batches:
            state["mask"], state["last"] = (counted[0] if counted else attention_mask), None
            result.tokens += int(state["mask"].sum())
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
            state["last"] = None  # never keep a batch's activations alive
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return result


def _head_on_one_position(model: nn.Module, modules: Sequence[str]) -> dict[str, int]:
    """``{"logits_to_keep": 1}`` where the causal LM takes it and no hooked module is its output head."""
    import inspect

    get_base = getattr(model, "get_base_model", None)
    lm = get_base() if callable(get_base) else model  # the transformers model inside a PEFT wrapper
    get_head = getattr(lm, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None or "logits_to_keep" not in inspect.signature(lm.forward).parameters:
        return {}
    if any(model.get_submodule(name) is head for name in modules):
        return {}
    return {"logits_to_keep": 1}
