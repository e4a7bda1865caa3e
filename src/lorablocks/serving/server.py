"""``lorablocks serve``: an OpenAI-compatible server whose composition of blocks changes live, exactly.

Endpoints (all behind ``Authorization: Bearer KEY`` when an API key is set):

* ``GET /v1/models``; ``POST /v1/completions``; ``POST /v1/chat/completions`` (``stream: true`` as
  server-sent events). Every completion carries the fingerprint of the composition that produced it, as
  ``system_fingerprint`` and in the ``X-Lorablocks-Fingerprint`` header (``base``: no block active).
* ``GET /v1/blocks``; ``PUT /v1/blocks`` (the whole composition); ``POST /v1/blocks/{name}`` (add or
  re-weight); ``DELETE /v1/blocks/{name}``.

Errors are OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``, with one clear message; the
status of every library error is decided in one place, :func:`lorablocks.serving.errors.error_status`.
"""

from __future__ import annotations

import contextlib
import hmac
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from lorablocks.errors import LoraBlocksError
from lorablocks.serving.errors import AuthError, RequestError, describe, error_body
from lorablocks.serving.live import LiveModel, Runner
from lorablocks.serving.routes import FINGERPRINT_HEADER, AppSettings, add_routes

__all__ = ["FINGERPRINT_HEADER", "AppSettings", "ServeSettings", "error_response", "create_app", "serve"]


def _error(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def error_response(exc: BaseException) -> JSONResponse:
    """The one translation of an exception into an HTTP answer."""
    status, body = describe(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


# ---------------------------------------------------------------------------------------------- the app


def create_app(live: LiveModel, runner: Runner, settings: AppSettings | None = None) -> FastAPI:
    """The FastAPI application serving ``live``; generations run on ``runner``."""
    settings = settings or AppSettings()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        runner.shutdown()

    app = FastAPI(title="lorablocks", summary="LoRA blocks composed live into a served model", lifespan=lifespan)
    app.state.live, app.state.runner, app.state.settings = live, runner, settings
    _add_error_handlers(app)
    if settings.api_key:
        app.add_middleware(_ApiKeyMiddleware, key=settings.api_key)
    add_routes(app, live, runner, settings)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoraBlocksError)
    async def _library(_request: Any, exc: LoraBlocksError) -> Any:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Any, exc: RequestValidationError) -> Any:
        status, message, param = validation_message(exc.errors())
        return _error(status, message, param)

    @app.exception_handler(HTTPException)
    async def _http(_request: Any, exc: HTTPException) -> Any:
        return _error(exc.status_code, str(exc.detail), None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _other(_request: Any, exc: Exception) -> Any:
        return error_response(exc)


def validation_message(errors: Sequence[Any]) -> tuple[int, str, str | None]:
    """A request that does not parse: 400 for malformed JSON, else 422; one line naming the field."""
    first = dict(errors[0]) if errors else {"type": "", "loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return 400, f"the request body is not valid JSON{': ' + str(detail) if detail else ''}", None
    field_name = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and not _is_branch(p)) or None
    if first.get("type") == "missing" and field_name is None:
        return 422, "the request needs a JSON object body", None
    fields = {tuple(str(p) for p in e.get("loc", ())[:2]) for e in errors}
    more = f" (and {len(fields) - 1} more invalid fields)" if len(fields) > 1 else ""
    return 422, f"{field_name or 'request body'}: {first.get('msg', 'invalid')}{more}", field_name


def _is_branch(part: Any) -> bool:
    """A union member's tag in an error location (``str``, ``list[str]``, ``_TextPart``), not a field."""
    text = str(part)
    return isinstance(part, str) and ("[" in text or text in _TYPE_TAGS or text[:1].isupper() or text[:1] == "_")


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "bytes"}


class _ApiKeyMiddleware:
    """Every request needs ``Authorization: Bearer KEY`` (401 otherwise), checked in constant time."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.key = app, f"Bearer {key}".encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.key):
                response = error_response(AuthError("missing or wrong API key: send the header "
                                                    "'Authorization: Bearer KEY'"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ------------------------------------------------------------------------------------------ serving


@dataclass(frozen=True)
class ServeSettings:
    """``lorablocks serve``: model, blocks folder, address, limits, and the composition at start."""

    blocks: str
    model: str = "smollm2-135m"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_tokens_limit: int = 512
    active: tuple[tuple[str, float], ...] = field(default_factory=tuple)
    workers: int = 4
    queue: int = 32
    cache_dir: str | None = None


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise LoraBlocksError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", setting="port") from None


def _served_name(spec: str) -> str:
    from pathlib import Path

    return Path(spec.rstrip("/")).name or spec


def serve(settings: ServeSettings, announce: Callable[[str], None] = print) -> None:
    """Load the model, apply the starting composition, and serve until Ctrl-C (which stops it cleanly:
    running generations end at their next token)."""
    from lorablocks.model.session import ComposedModel
    from lorablocks.serving.blocks import BlockLibrary

    if not 1 <= settings.max_tokens_limit:
        raise RequestError("the max_tokens limit must be a positive integer", setting="max_tokens_limit")
    library = BlockLibrary(settings.blocks)
    for name, _ in settings.active:  # name errors before the slow model load
        library.path(name)
    live = LiveModel(ComposedModel.load(settings.model, cache_dir=settings.cache_dir), library)
    if settings.active:
        live.set_active(settings.active)
    runner = Runner(settings.workers, settings.queue)
    app = create_app(live, runner, AppSettings(model_name=_served_name(settings.model), api_key=settings.api_key,
                                               max_tokens_limit=settings.max_tokens_limit))
    sock = _bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    server = _Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=10), runner)
    shown = f"[{host}]" if ":" in host else host
    announce(f"serving {settings.model} on http://{shown}:{port}/v1 ({len(library.names())} blocks available, "
             f"composition {live.fingerprint[:12]}); Ctrl-C stops")
    if not settings.api_key and host not in ("127.0.0.1", "::1", "localhost"):
        announce(f"warning: listening on {host} without --api-key: anyone who can reach it can change the model")
    try:
        server.run(sockets=[sock])
    finally:
        runner.shutdown()
        sock.close()


class _Server(uvicorn.Server):
    """uvicorn's server that also tells running generations to stop when Ctrl-C arrives."""

    def __init__(self, config: uvicorn.Config, runner: Runner) -> None:
        super().__init__(config)
        self.runner = runner

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.runner.stopping.set()
        super().handle_exit(sig, frame)
