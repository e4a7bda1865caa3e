"""The server's request bodies (OpenAI's fields that matter here) and the OpenAI response and stream-chunk
objects.

As OpenAI clients expect: ``null`` for an optional field means its default; fields that do not change the
answer (``user``, ``metadata``, ...) are ignored; a field that would change it and is not supported here
(``logprobs``, ``tools``, penalties, ...) is refused (400) unless it holds its neutral value, never silently
ignored. Chat history may hold ``tool`` messages and assistant messages with ``content: null``.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from lorablocks.serving.errors import RequestError
from lorablocks.serving.generation import SamplingParams

__all__ = ["CompletionRequest", "ChatRequest", "ChatMessage", "BlockWeight", "PutBlocks", "PostBlock",
           "sampling_params", "completion_object", "chat_object", "new_id", "usage"]


def _unicode(text: str) -> str:
    """Refuse a lone surrogate (JSON can spell ``"\\ud800"``): it is not text and no tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError("unicode", "holds a lone surrogate {char} at character {at}, not valid Unicode text",
                                  {"char": ascii(text[exc.start]), "at": exc.start}) from None
    return text


#: a string of valid Unicode (what a tokenizer can take)
Text = Annotated[str, AfterValidator(_unicode)]


def _neutral(value: Any, *neutral: Any) -> bool:
    return value is None or value is False or any(value == n and type(value) is type(n) for n in neutral)


#: fields that would change the answer, are not supported, and the values that leave it unchanged
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (), "top_logprobs": (0,), "best_of": (1,), "echo": (), "suffix": ("",), "logit_bias": ({},),
    "tools": ([],), "functions": ([],), "tool_choice": ("none",), "function_call": ("none",),
    "response_format": ({"type": "text"},), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0),
    "repetition_penalty": (1, 1.0), "top_k": (0, -1), "min_p": (0, 0.0), "min_tokens": (0,), "audio": (),
    "prediction": (), "guided_json": (), "guided_regex": (), "guided_choice": (), "guided_grammar": (),
}


def _defaults_for_nulls(cls: type[BaseModel], data: Any) -> Any:
    """``null`` for an optional field: its default (OpenAI's clients send them); a required one stays an error."""
    if not isinstance(data, dict):
        return data
    fields = cls.model_fields
    return {k: v for k, v in data.items() if v is not None or (k in fields and fields[k].is_required())}


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # kept to refuse what would change the answer (UNSUPPORTED)

    _nulls = model_validator(mode="before")(classmethod(_defaults_for_nulls))

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    n: int = 1

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def check_supported(self) -> None:
        """Refuse a field that would change the answer and is not supported (unless it holds its neutral value)."""
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and not _neutral(value, *UNSUPPORTED[name]):
                raise RequestError(f"{name} is not supported by this server (it would change the answer); leave it "
                                   "out or null", setting=name)


class CompletionRequest(_OpenAIRequest):
    """``POST /v1/completions``: a plain prompt (a string, or a list of one string)."""

    prompt: Union[Text, list[Text]]


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    """One message of the history; ``tool_calls``, ``name``, ``tool_call_id`` are not shown to the model."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[Text, list[_TextPart]]] = None

    @model_validator(mode="after")
    def _content(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content (only an assistant's may be null)")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_OpenAIRequest):
    """``POST /v1/chat/completions``: messages through the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)

    def requested_max_tokens(self) -> Optional[int]:
        """``max_completion_tokens`` (OpenAI's current name) or ``max_tokens`` (its older one); both only if equal."""
        a, b = self.max_completion_tokens, self.max_tokens
        if a is not None and b is not None and a != b:
            raise RequestError(f"max_tokens ({b}) and max_completion_tokens ({a}) differ: send one of them "
                               "(max_completion_tokens is OpenAI's current name)", setting="max_completion_tokens")
        return a if a is not None else b

    def template_messages(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class BlockWeight(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    weight: float = Field(1.0, allow_inf_nan=False)


class PutBlocks(BaseModel):
    """``PUT /v1/blocks``: the whole composition (empty: the base model)."""

    model_config = ConfigDict(extra="forbid")

    active: list[BlockWeight]


class PostBlock(BaseModel):
    """``POST /v1/blocks/{name}``: add the block, or change its weight (negative subtracts)."""

    model_config = ConfigDict(extra="forbid")

    weight: float = Field(1.0, allow_inf_nan=False)


def sampling_params(req: _OpenAIRequest, max_tokens: Optional[int], default: int, limit: int) -> SamplingParams:
    """The request's sampling settings, checked against this server's limit."""
    req.check_supported()
    if req.n != 1:
        raise RequestError(f"n must be 1 (one completion per request), got {req.n}", setting="n")
    n = default if max_tokens is None else max_tokens
    if n > limit:
        raise RequestError(f"max_tokens {n} is over this server's limit of {limit}", setting="max_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise RequestError("stop takes up to 4 non-empty strings", setting="stop")
    return SamplingParams(max_new_tokens=n, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                          stop=tuple(stop))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _envelope(kind: str, rid: str, model: str, fingerprint: str, choice: dict[str, Any]) -> dict[str, Any]:
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint, "choices": [choice]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_object(rid: str, model: str, fingerprint: str, text: str, finish: Optional[str]) -> dict[str, Any]:
    """A ``text_completion`` (whole, or one stream chunk: the same object with part of the text)."""
    return _envelope("text_completion", rid, model, fingerprint,
                     {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})


def chat_object(rid: str, model: str, fingerprint: str, text: Optional[str], finish: Optional[str],
                chunk: bool = False, role: bool = False) -> dict[str, Any]:
    """A ``chat.completion``, or a ``chat.completion.chunk`` whose delta holds ``text`` (and the role)."""
    if not chunk:
        return _envelope("chat.completion", rid, model, fingerprint,
                         {"index": 0, "message": {"role": "assistant", "content": text},
                          "finish_reason": finish, "logprobs": None})
    delta: dict[str, Any] = {"role": "assistant"} if role else {}
    if text is not None:
        delta["content"] = text
    return _envelope("chat.completion.chunk", rid, model, fingerprint,
                     {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None})
