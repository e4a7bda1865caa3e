"""``lorablocks serve``: an OpenAI-compatible server whose composition of blocks changes live, exactly.

Endpoints (all behind ``Authorization: Bearer KEY`` when an API key is set; see
:mod:`lorablocks.serving.guard` for what every request passes first, and who may change the composition):

* ``GET /v1/models``; ``POST /v1/completions``; ``POST /v1/chat/completions`` (``stream: true`` as
  server-sent events). Every completion carries the fingerprint of the composition that produced it, as
  ``system_fingerprint`` and in the ``X-Lorablocks-Fingerprint`` header (``base``: no block active).
* ``GET /v1/blocks``; ``PUT /v1/blocks`` (the whole composition); ``POST /v1/blocks/{name}`` (add or
  re-weight); ``DELETE /v1/blocks/{name}``.

Generations are decoded together (continuous batching, :mod:`lorablocks.serving.scheduler`, ``max_batch``); a
change of composition applies between two decoding steps and cuts the generations that are running (their last
chunk's ``finish_reason`` is ``composition_changed``), so every answer's fingerprint is that of the weights behind
all of its tokens. ``max_batch = 0``: a thread per generation (``workers``), and a change waits for them all.

Errors are OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``, with one clear message; the
status of every library error is decided in one place, :func:`lorablocks.serving.errors.error_status`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from lorablocks.compose.methods import get_method
from lorablocks.errors import LoraBlocksError
from lorablocks.serving.errors import RequestError
from lorablocks.serving.guard import LOG, Access, Guard, error_for, error_json
from lorablocks.serving.live import LiveModel, Runner, check_method, check_statistics
from lorablocks.serving.routes import FINGERPRINT_HEADER, AppSettings, Engine, add_routes
from lorablocks.serving.scheduler import Scheduler

__all__ = ["FINGERPRINT_HEADER", "Access", "AppSettings", "ServeSettings", "create_app", "serve"]


def create_app(live: LiveModel, runner: Engine, settings: AppSettings | None = None) -> FastAPI:
    """The FastAPI application serving ``live``; generations run on ``runner`` (a
    :class:`~lorablocks.serving.scheduler.Scheduler` or a :class:`Runner`); every request passes the
    :class:`~lorablocks.serving.guard.Guard` of ``settings.access`` first."""
    settings = settings or AppSettings()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        runner.shutdown()

    app = FastAPI(title="lorablocks", summary="LoRA blocks composed live into a served model", lifespan=lifespan)
    app.state.live, app.state.runner, app.state.settings = live, runner, settings
    _add_error_handlers(app)
    app.add_middleware(Guard, access=settings.access)
    add_routes(app, live, runner, settings)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Known errors as their 4xx (anything else reaches the Guard's catch-all: one JSON 500)."""

    @app.exception_handler(LoraBlocksError)
    async def _library(request: Request, exc: LoraBlocksError) -> Any:
        return error_for(request.method, request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Any:
        status, message, param = validation_message(exc.errors())
        return error_json(request.method, request.url.path, status, message, param)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Any:
        return error_json(request.method, request.url.path, exc.status_code, str(exc.detail), None,
                          getattr(exc, "headers", None))


def validation_message(errors: Sequence[Any]) -> tuple[int, str, str | None]:
    """A request that does not parse: 400 for malformed JSON, else 422; one line naming the field."""
    # of a union's branches, the one that got furthest (a value error, not "should be a string") explains best
    specific = [e for e in errors if not str(dict(e).get("type", "")).endswith("_type")]
    first = dict((specific or list(errors))[0]) if errors else {"type": "", "loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return 400, f"the request body is not valid JSON{': ' + str(detail) if detail else ''}", None
    field_name = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and not _is_branch(p)) or None
    if first.get("type") == "missing" and field_name is None:
        return 422, "the request needs a JSON object body", None
    fields = {tuple(str(p) for p in e.get("loc", ())[:2]) for e in errors}
    more = f" (and {len(fields) - 1} more invalid fields)" if len(fields) > 1 else ""
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return 422, f"{field_name or 'request body'}: {message}{more}", field_name


def _is_branch(part: Any) -> bool:
    """A union member's tag in an error location (``str``, ``list[str]``, ``_TextPart``), not a field."""
    text = str(part)
    return isinstance(part, str) and ("[" in text or text in _TYPE_TAGS or text[:1].isupper() or text[:1] == "_")


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "bytes"}


# ------------------------------------------------------------------------------------------ serving


#: the dtypes ``serve`` keeps the weights in: float32 (every merge exact in it), or bfloat16 (half the bytes per
#: decoding step; where the hardware computes bf16 natively a batched step of 8 rows costs about one of 1)
SERVE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ServeSettings:
    """``lorablocks serve``: model, blocks folder, address, limits, the composition method (and its parameters)
    of every change, and the composition at start."""

    blocks: str
    model: str = "smollm2-135m"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    admin_key: str | None = None
    #: ``Host`` names accepted besides this machine's own and the address it listens on
    allowed_hosts: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 512
    active: tuple[tuple[str, float], ...] = field(default_factory=tuple)
    #: generations decoded together by the scheduler (continuous batching); 0: a thread per generation, ``workers``
    max_batch: int = 16
    workers: int = 4
    queue: int = 32
    #: per-request compositions held at once (``"model": "a+b:0.5"``, served unmerged; needs ``max_batch`` > 0)
    max_compositions: int = 4
    cache_dir: str | None = None
    method: str = "sum"
    params: Mapping[str, Any] = field(default_factory=dict)
    #: the weights' dtype (:data:`SERVE_DTYPES`): float32, or bfloat16 (merges computed in float32, then rounded)
    dtype: str = "float32"

    def access(self, bound: str) -> Access:
        """Who may do what, once the server listens on address ``bound``."""
        wildcard = bound in ("0.0.0.0", "::", "")
        hosts = (*self.allowed_hosts, *(() if wildcard else (self.host, bound)))
        return Access(api_key=self.api_key, admin_key=self.admin_key, hosts=hosts, any_ip_host=wildcard,
                      max_body_bytes=self.max_body_bytes)


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
    settings.access(settings.host)  # the keys and limits, checked before the slow model load
    library = BlockLibrary(settings.blocks)
    params = check_method(settings.method, settings.params)
    for name, _ in settings.active:  # name errors before the slow model load
        library.path(name)
    if settings.active and get_method(settings.method).needs_statistics:  # a block without them, before the load
        check_statistics([library.get(name) for name, _ in settings.active], settings.method)
    if settings.dtype not in SERVE_DTYPES:
        raise RequestError(f"the weights' dtype must be one of {', '.join(SERVE_DTYPES)}, got {settings.dtype!r}",
                           setting="dtype")
    composed = ComposedModel.load(settings.model, cache_dir=settings.cache_dir, dtype=SERVE_DTYPES[settings.dtype])
    live = LiveModel(composed, library, settings.method, params)
    if settings.active:
        live.set_active(settings.active)
    sock = _bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    runner: Engine = (Scheduler(live, settings.max_batch, settings.queue) if settings.max_batch > 0
                      else Runner(settings.workers, settings.queue))
    app = create_app(live, runner, AppSettings(model_name=_served_name(settings.model), access=settings.access(host),
                                               max_tokens_limit=settings.max_tokens_limit,
                                               max_compositions=settings.max_compositions))
    _log_to_stderr()
    server = _Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=10), runner)
    shown = f"[{host}]" if ":" in host else host
    announce(f"serving {settings.model} ({settings.dtype}) on http://{shown}:{port}/v1 ({len(library.names())} blocks available, "
             f"composition {live.fingerprint[:12]}, method {live.method}); Ctrl-C stops")
    if not settings.api_key and host not in ("127.0.0.1", "::1", "localhost"):
        announce(f"warning: listening on {host} without --api-key: anyone who can reach it can generate")
    try:
        server.run(sockets=[sock])
    finally:
        runner.shutdown()
        sock.close()


def _log_to_stderr() -> None:
    """The server's log (one line per refused request or error) on stderr."""
    if not LOG.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        LOG.addHandler(handler)
        LOG.setLevel(logging.INFO)
        LOG.propagate = False


class _Server(uvicorn.Server):
    """uvicorn's server that also tells running generations to stop when Ctrl-C arrives."""

    def __init__(self, config: uvicorn.Config, runner: Engine) -> None:
        super().__init__(config)
        self.runner = runner

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.runner.stopping.set()
        super().handle_exit(sig, frame)
