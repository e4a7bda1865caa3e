"""What every request passes before it reaches an endpoint, in one ASGI middleware, and the one place an error
becomes an HTTP answer and one line of the server's log.

In order: the ``Host`` must be one this server answers to (a DNS-rebinding page sends its own name: 421);
the keys (the API key to use the server, the admin key to change its composition; without an admin key a
change is refused, or without any key allowed only from this machine: 401/403); a request with a body must
say ``Content-Type: application/json`` (what a web page cannot send to another site without the server's
consent: 415); the body is read up to ``max_body_bytes`` and refused as soon as it is over (413), before the
rest is read, with or without ``Content-Length``. Anything an endpoint raises that no handler knows is
answered as one JSON 500 and logged as one line, never as a traceback.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

from lorablocks.errors import LoraBlocksError, one_line
from lorablocks.serving.errors import describe, error_body, printable

__all__ = ["LOG", "LOOPBACK_HOSTS", "Access", "Guard", "error_json", "log_error", "is_change"]

#: the server's log: one line per refused request, one per internal error
LOG = logging.getLogger("lorablocks.serving")

#: Host names always accepted: this machine's own
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

_BODY_METHODS = {"POST", "PUT", "PATCH"}
_READ_METHODS = {"GET", "HEAD", "OPTIONS"}

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class Access:
    """Who may do what, and what a request may be.

    ``api_key``: needed by every request (the admin key also works). ``admin_key``: needed to change the
    composition. Without an admin key, changes are refused when an API key is set, and allowed only from
    loopback clients when no key is set at all. ``hosts``: accepted ``Host`` names besides
    :data:`LOOPBACK_HOSTS`; ``any_ip_host``: also any IP address (a server bound to every interface).
    """

    api_key: str | None = None
    admin_key: str | None = None
    hosts: tuple[str, ...] = ()
    any_ip_host: bool = False
    max_body_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        for setting, label, key in (("api_key", "API key", self.api_key), ("admin_key", "admin key", self.admin_key)):
            if key is not None and (not key or not all("!" <= c <= "~" for c in key)):
                raise LoraBlocksError(f"the {label} must be a non-empty string of printable ASCII without spaces "
                                      "(leave it unset for none)", setting=setting)
        if self.api_key is not None and self.api_key == self.admin_key:
            raise LoraBlocksError("the admin key must differ from the API key (else every client could change "
                                  "the composition)", setting="admin_key")
        if self.max_body_bytes < 1:
            raise LoraBlocksError(f"the body limit must be a positive number of bytes, got {self.max_body_bytes}",
                                  setting="max_body_bytes")

    def allows_host(self, name: str) -> bool:
        name = name.lower()
        if name in LOOPBACK_HOSTS or name in {h.lower() for h in self.hosts}:
            return True
        return self.any_ip_host and _is_ip(name)


def is_change(method: str, path: str) -> bool:
    """Does this request change the composition (anything but a read of ``/v1/blocks...``)?"""
    return method not in _READ_METHODS and (path == "/v1/blocks" or path.startswith("/v1/blocks/"))


def log_error(method: str, path: str, status: int, message: str) -> None:
    """One line in the server's log (control characters escaped: a request cannot add lines)."""
    line = printable(f"{status} {method} {path}: {message}")
    (LOG.error if status >= 500 else LOG.warning)(line)


def error_json(method: str, path: str, status: int, message: str, param: str | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI-shaped error answer, logged as one line."""
    log_error(method, path, status, message)
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def error_for(method: str, path: str, exc: BaseException) -> JSONResponse:
    """The one translation of an exception into an HTTP answer (and its log line)."""
    status, body = describe(exc)
    return error_json(method, path, status, body["error"]["message"], body["error"]["param"],
                      {"Retry-After": "1"} if status == 503 else None)


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _host_name(value: str) -> str:
    """The name in a ``Host`` header (``[::1]:8000`` -> ``::1``); :class:`_Refused` when malformed."""
    if value.startswith("["):
        name, sep, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else rest
        ok = bool(sep) and (not rest or (rest.startswith(":") and port.isdigit()))
    else:
        name, _, port = value.partition(":")
        ok = bool(name) and (not port or port.isdigit()) and value.count(":") <= 1
    if not ok:
        raise _Refused(400, f"malformed Host header {value!r}")
    return name


def _loopback(scope: Scope) -> bool:
    client = scope.get("client")
    try:
        ip = ipaddress.ip_address(client[0]) if client else None
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip is not None and ip.is_loopback


class Guard:
    """The checks above, then the endpoint (on the body read here), and the catch-all for the unexpected."""

    def __init__(self, app: Any, access: Access) -> None:
        self.app, self.access = app, access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope.get("method", "?"), scope.get("path", "?")
        started = False

        async def tracked(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            headers = _headers(scope)
            self._check(scope, method, path, headers)
            body = await self._body(receive, headers)
            await self.app(scope, _replay(body, receive), tracked)
        except _Refused as exc:
            await error_json(method, path, exc.status, str(exc))(scope, receive, send)
        except Exception as exc:  # a bug: one line in the log, one JSON 500 to the client, no traceback
            if started:
                log_error(method, path, 500, f"internal error after the answer began: {type(exc).__name__}: "
                                             f"{one_line(exc)}")
            else:
                await error_for(method, path, exc)(scope, receive, send)

    def _check(self, scope: Scope, method: str, path: str, headers: dict[bytes, bytes]) -> None:
        host = headers.get(b"host")
        if host is None:
            raise _Refused(400, "the request has no Host header")
        name = _host_name(host.decode("latin-1"))
        if not self.access.allows_host(name):
            raise _Refused(421, f"this server does not answer to the host name {name!r} (a page on another site "
                                "may be trying to reach it); the operator can allow it with --allowed-host")
        self._authorize(scope, method, path, headers.get(b"authorization", b""))
        if method in _BODY_METHODS:
            kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if kind != b"application/json":
                shown = kind.decode("latin-1") or "none"
                raise _Refused(415, f"send the body as JSON with 'Content-Type: application/json' (got {shown!r})")

    def _authorize(self, scope: Scope, method: str, path: str, given: bytes) -> None:
        a = self.access
        admin = a.admin_key is not None and hmac.compare_digest(given, f"Bearer {a.admin_key}".encode())
        user = a.api_key is not None and hmac.compare_digest(given, f"Bearer {a.api_key}".encode())
        if a.api_key is not None and not (user or admin):
            raise _Refused(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'")
        if not is_change(method, path) or admin:
            return
        if a.admin_key is not None:
            status = 403 if user else 401
            raise _Refused(status, "changing the composition needs the admin key: send 'Authorization: Bearer "
                                   "ADMIN_KEY'" + (" (the API key only generates)" if user else ""))
        if a.api_key is not None:
            raise _Refused(403, "this server takes no composition changes: it was started with an API key but "
                                "no admin key (--admin-key)")
        if not _loopback(scope):
            raise _Refused(403, "without an admin key (--admin-key) the composition can be changed only from "
                                "this machine")

    async def _body(self, receive: Receive, headers: dict[bytes, bytes]) -> bytes:
        """The whole body, refused (413) as soon as it is known to be over the limit."""
        limit = self.access.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise _Refused(400, "malformed Content-Length header")
            if int(declared) > limit:
                raise _Refused(413, f"the request body is {int(declared)} bytes, over this server's limit of "
                                    f"{limit} bytes")
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                raise _Refused(400, "the client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _Refused(413, f"the request body is over this server's limit of {limit} bytes")
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)


def _headers(scope: Scope) -> dict[bytes, bytes]:
    """Header names (lower case, as ASGI gives them) to values; a repeated header keeps its first value."""
    out: dict[bytes, bytes] = {}
    for name, value in scope.get("headers") or []:
        out.setdefault(bytes(name).lower(), bytes(value))
    return out


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands over the body read already, then waits on the client (for a disconnect)."""
    sent = False

    async def replay() -> MutableMapping[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
