"""Prompt templating and streamed token-by-token generation on a (composed) causal LM.

The combination is already merged into the weights (:class:`~lorablocks.model.session.ComposedModel`), so
generation is a plain forward loop with a KV cache: nothing per token depends on the blocks. Temperature 0
is greedy (``argmax``) and deterministic; otherwise the next token is drawn from ``softmax(logits / T)``
restricted to the top-``p`` nucleus, with a generator of its own seeded per request, so concurrent
requests never share random state.

Prompts: a chat (``messages``) goes through the tokenizer's chat template when it has one; a plain prompt
is completed as is (``raw``) or wrapped in the study's template ``Question: ...\\nAnswer:`` (``qa``).
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lorablocks.errors import one_line
from lorablocks.serving.errors import RequestError

__all__ = ["SamplingParams", "Chunk", "PromptMode", "encode_prompt", "encode_chat", "generate_stream",
           "generate_text", "Decoding", "cache_argument", "cache_of", "eos_token_ids", "context_length", "tokens_left",
           "check_length", "check_text"]

PromptMode = Literal["auto", "chat", "raw", "qa"]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens: ``temperature`` 0 is greedy; ``stop`` strings end the text (not included)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}",
                               setting="max_new_tokens")
        if not 0.0 <= self.temperature < float("inf"):
            raise RequestError(f"temperature must be a number >= 0, got {self.temperature}", setting="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}", setting="top_p")


@dataclass(frozen=True)
class Chunk:
    """A piece of generated text; the last one has a ``finish_reason`` (``stop`` or ``length``)."""

    text: str
    finish_reason: str | None = None
    tokens: int = 0


# ------------------------------------------------------------------------------------------- prompts


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    check_text(text, "prompt")
    ids = list(tokenizer(text, add_special_tokens=special)["input_ids"])
    if not ids:  # an empty prompt: start from BOS (or EOS, GPT-2's document separator)
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [start] if start is not None else []
    return ids


def check_text(text: str, setting: str) -> str:
    """``text`` if it is valid Unicode (encodable as UTF-8); a lone surrogate (``\\ud800``) is refused."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(f"{setting} holds {text[exc.start]!a} at character {exc.start}: a lone surrogate, not "
                           "text (send valid UTF-16 pairs or UTF-8)", setting=setting) from None
    return text


def encode_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of a chat, ready for the assistant's answer.

    With a chat template: the template with the generation prompt. Without one: ``role: content`` lines
    followed by ``assistant:``.
    """
    if getattr(tokenizer, "chat_template", None):
        text = _render_chat(tokenizer, messages)
        return _encode(tokenizer, text, special=False)  # the template already holds the special tokens
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return _encode(tokenizer, text, special=True)


def _render_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> str:
    """The chat template's text; a template that refuses the messages (roles out of order, a role it does not
    know: its ``raise_exception``) is a :class:`RequestError` naming the messages."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True, tokenize=False)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise RequestError(f"the model's chat template refuses these messages: {one_line(exc)}",
                           setting="messages") from None


def encode_prompt(tokenizer: Any, prompt: str, mode: PromptMode = "auto") -> list[int]:
    """Token ids of ``prompt``: ``chat`` (one user message), ``raw``, ``qa`` (``Question: ...\\nAnswer:``,
    tokenized like training: only the tokens the tokenizer puts before a text, e.g. BOS) or ``auto`` (chat
    when the tokenizer has a template)."""
    if mode == "auto":
        mode = "chat" if getattr(tokenizer, "chat_template", None) else "raw"
    if mode == "chat":
        return encode_chat(tokenizer, [{"role": "user", "content": prompt}])
    if mode == "qa":
        from lorablocks.training.data import Example, format_prompt, leading_special_ids

        text = format_prompt(Example(id="prompt", question=prompt, answer=""))
        return leading_special_ids(tokenizer) + _encode(tokenizer, text, special=False)
    return _encode(tokenizer, prompt, special=True)


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Tokens that end an answer: the generation config's EOS id(s) and the tokenizer's."""
    ids: set[int] = set()
    cfg = getattr(model, "generation_config", None)
    for value in (getattr(cfg, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def context_length(model: Any) -> int | None:
    """The model's maximum number of positions, when its config says."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def tokens_left(model: Any, prompt_tokens: int, setting: str | None = None) -> int | None:
    """How many tokens the model's positions leave after the prompt (``None``: no known limit); a prompt
    that leaves none is refused, blaming the prompt (``setting``)."""
    limit = context_length(model)
    if limit is None:
        return None
    if prompt_tokens >= limit:
        raise RequestError(f"the prompt is {prompt_tokens} tokens, too long for the model's context of {limit} "
                           "tokens (it must leave room for at least one new token)", setting=setting)
    return limit - prompt_tokens


def check_length(model: Any, prompt_tokens: int, max_new_tokens: int, setting: str = "max_new_tokens",
                 prompt_setting: str | None = None) -> None:
    """Refuse a request whose prompt plus answer would not fit the model's positions, blaming the prompt
    when it alone fills them and ``setting`` (the number of new tokens) otherwise."""
    left = tokens_left(model, prompt_tokens, prompt_setting)
    if left is not None and max_new_tokens > left:
        raise RequestError(f"{setting} {max_new_tokens} does not fit: the prompt is {prompt_tokens} tokens and the "
                           f"model's context of {prompt_tokens + left} tokens leaves room for {left}", setting=setting)


# ------------------------------------------------------------------------------------------ decoding


class _StopDecoder:
    """Turns tokens into text increments, ending at the first stop string and holding back text that
    could still become one (so a stop string is never half-sent)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> tuple[str, bool]:
        """The new text after ``token`` and whether a stop string ended it."""
        self.ids.append(token)
        text = self._text()
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            cut = max(min(hits), self.sent)
            return self._emit(text, cut), True
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the next token
            return "", False
        held = max((k for s in self.stop for k in range(1, min(len(s), len(text) + 1))
                    if text.endswith(s[:k])), default=0)
        return self._emit(text, max(len(text) - held, self.sent)), False

    def finish(self) -> str:
        """Whatever is still held back (no stop string came)."""
        return self._emit(self._text(), None)

    def _emit(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        out, self.sent = text[self.sent:end], max(end, self.sent)
        return out


# ---------------------------------------------------------------------------------------- generation


def _next_token(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    if params.temperature == 0.0 or gen is None:
        return int(torch.argmax(logits))
    # softmax((l - max l) / T) in float64: every entry is <= 0 before the division, so a tiny T (1e-300, which
    # float32 would round to 0, making 0 / 0 = NaN) sends the others to -inf, never inf or NaN: the greedy limit
    logits = (logits.double() - logits.max().double()) / params.temperature
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        outside = (torch.cumsum(probs, dim=-1) - probs) > params.top_p  # the first token always stays
        sorted_logits[outside] = float("-inf")
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=gen))


def cache_argument(model: Any) -> tuple[str, dict[str, Any]]:
    """The forward argument that carries the KV cache (``cache`` in newer transformers, ``past_key_values``
    before), and a request for the last position's logits only, where supported (as ``generate`` does)."""
    params = inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    return ("cache" if "cache" in params else "past_key_values"), extra


def cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _generator(params: SamplingParams) -> torch.Generator | None:
    """A generator of the request's own, seeded by it (or at random); ``None`` when greedy."""
    if params.temperature == 0.0:
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator().manual_seed(seed & ((1 << 63) - 1))


class Decoding:
    """One request's token choice and text: its sampling settings and generator, its stop strings, its EOS
    ids (an empty set never stops early) and its count. The one place a next token becomes text, alone
    (:func:`generate_stream`) or in a batch (:mod:`lorablocks.serving.scheduler`)."""

    def __init__(self, tokenizer: Any, params: SamplingParams, eos_ids: set[int]) -> None:
        self.params, self.eos, self.tokens = params, eos_ids, 0
        self.gen, self.decoder = _generator(params), _StopDecoder(tokenizer, params.stop)

    def step(self, logits: torch.Tensor) -> tuple[int, Chunk | None]:
        """The next token after ``logits`` (the last position's), and the chunk to send: ``None`` (nothing yet),
        text, or the last chunk (``finish_reason`` ``stop`` or ``length``)."""
        token = _next_token(logits, self.params, self.gen)
        self.tokens += 1
        if token in self.eos:
            return token, Chunk(self.decoder.finish(), "stop", self.tokens)
        text, stopped = self.decoder.push(token)
        if stopped:
            return token, Chunk(text, "stop", self.tokens)
        if self.tokens >= self.params.max_new_tokens:
            return token, Chunk(text + self.decoder.finish(), "length", self.tokens)
        return token, (Chunk(text, None, self.tokens) if text else None)

    def cut(self, reason: str) -> Chunk:
        """The last chunk of a generation ended from outside (``reason``), with the text still held back."""
        return Chunk(self.decoder.finish(), reason, self.tokens)


@torch.no_grad()
def generate_stream(model: Any, tokenizer: Any, ids: Sequence[int], params: SamplingParams, *,
                    should_stop: Callable[[], bool] | None = None,
                    eos_ids: set[int] | None = None) -> Iterator[Chunk]:
    """Generate after ``ids``, yielding text as it is produced; the last chunk has the finish reason.

    ``should_stop`` is polled before every token (a cancelled request, a stopping server); ``eos_ids``
    defaults to :func:`eos_token_ids` (an empty set never stops early).
    """
    device = next(model.parameters()).device
    decoding = Decoding(tokenizer, params, eos_token_ids(model, tokenizer) if eos_ids is None else eos_ids)
    cache_arg, extra = cache_argument(model)
    inputs, cache = torch.tensor([list(ids)], device=device), None
    while True:
        if should_stop is not None and should_stop():
            yield decoding.cut("length")
            return
        out = model(input_ids=inputs, use_cache=True, **{cache_arg: cache}, **extra)
        cache = cache_of(out)
        token, chunk = decoding.step(out.logits[0, -1])
        if chunk is not None:
            yield chunk
            if chunk.finish_reason:
                return
        inputs = torch.tensor([[token]], device=device)


def generate_text(model: Any, tokenizer: Any, ids: Sequence[int], params: SamplingParams) -> tuple[str, str, int]:
    """The whole answer at once: ``(text, finish_reason, completion tokens)``."""
    parts, reason, n = [], "length", 0
    for chunk in generate_stream(model, tokenizer, ids, params):
        parts.append(chunk.text)
        reason, n = chunk.finish_reason or reason, chunk.tokens or n
    return "".join(parts), reason, n
