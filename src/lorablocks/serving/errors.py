"""Typed errors of live use (``generate``, ``serve``), and the one table that maps every library error to an
HTTP status and an OpenAI-shaped error body (the CLI prints the same errors as one line)."""

from __future__ import annotations

from typing import Any

from lorablocks.errors import (AdapterFormatError, CompositionError, ConfigError, LoraBlocksError, NonFiniteError,
                               ShapeMismatchError, UnsupportedAdapterError, one_line)

__all__ = ["BlockNameError", "UnknownBlockError", "ModelNotFoundError", "RequestError", "ServerBusyError", "AuthError", "error_status",
           "error_body", "describe", "printable"]


class BlockNameError(LoraBlocksError):
    """A block name holds a path (separator, ``..``, a hidden name) or leads outside the blocks folder."""


class UnknownBlockError(LoraBlocksError):
    """No adapter of that name in the blocks folder (or, when removing, no active block of that name)."""


class ModelNotFoundError(LoraBlocksError):
    """A request's ``model`` is neither the server's model nor a composition of its blocks."""


class RequestError(LoraBlocksError):
    """A request's value is out of what this server allows (``max_tokens`` over the limit, ``n`` > 1, ...)."""


class ServerBusyError(LoraBlocksError):
    """The queue of waiting generations is full (or the server is stopping)."""


class AuthError(LoraBlocksError):
    """Missing or wrong API key."""


#: library error -> HTTP status; the first matching class wins (subclasses before their bases)
_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (AuthError, 401),
    (BlockNameError, 400),
    (RequestError, 400),
    (UnknownBlockError, 404),
    (ModelNotFoundError, 404),
    (ServerBusyError, 503),
    (AdapterFormatError, 422),  # a block that is corrupt or not an adapter
    (UnsupportedAdapterError, 422),
    (ShapeMismatchError, 422),  # a block that does not fit the model (shapes, recorded base model)
    (NonFiniteError, 422),
    (CompositionError, 422),  # weights, duplicates, method
    (ConfigError, 422),
    (LoraBlocksError, 400),
)
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          413: "request_too_large", 415: "invalid_request_error", 421: "misdirected_request",
          422: "invalid_request_error", 503: "server_busy", 500: "server_error"}


def error_status(exc: BaseException) -> int:
    """The HTTP status of an error: 4xx for what the request got wrong, 503 when busy, 500 otherwise."""
    return next((status for cls, status in _STATUS if isinstance(exc, cls)), 500)


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object (the ``openai`` client reads ``error.message``); the message on one line, in
    valid Unicode (a lone surrogate from a request is shown escaped)."""
    return {"error": {"message": printable(message), "type": _TYPES.get(status, "invalid_request_error"),
                      "param": None if param is None else printable(param),
                      "code": status}}


def describe(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """``(status, body)`` of an exception: its one-line message, or an internal error's type and message."""
    status = error_status(exc)
    if status == 500:
        return 500, error_body(500, f"internal error: {type(exc).__name__}: {one_line(exc)}")
    return status, error_body(status, one_line(exc), getattr(exc, "setting", None))


def printable(text: str) -> str:
    """``text`` with control characters, lone surrogates and other unprintable characters escaped
    (``\\n``, ``\\ud800``): one line, encodable as UTF-8."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
