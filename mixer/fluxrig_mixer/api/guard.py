"""The control API's front door: what a request may cost before a route sees it.

Job. Two layers, both in front of every route:

1. `GuardMiddleware` (ASGI, outermost inside the app):
   - Credentials are checked from the headers before one byte of the body is read. A request
     without valid credentials may carry at most `UNAUTHENTICATED_BODY_BYTES` (a login form
     fits; a 150 MB upload is answered 401 at once, from its headers, with `Connection: close`,
     so the Mixer never buffers what a stranger sends). Its route still refuses it (401) as
     before; the middleware only decides whether the body is worth reading.
   - A size cap on every body: the declared Content-Length is refused up front (413), a chunked
     body is counted as it arrives and cut at the cap (413). The cap is `max_body_bytes`, or a
     route's own (`route_limits`: the scenario import takes `api.max_import_bytes`).
   - A body must arrive within `body_timeout` (a slow upload holds a request slot; 408).
   - At most `max_requests` requests in flight (503 with Retry-After past it); the health probe
     is exempt so a supervisor can tell "busy" from "dead".
2. `guarded_protocol(...)`: uvicorn's h11 protocol with what uvicorn lacks: a deadline for the
   request head (`header_timeout`: a client that dribbles its headers is cut off with 408, not
   held forever as 200 slow-header connections were) and a cap on open connections
   (`max_connections`, and `max_connections_per_client` per client address, so one address
   cannot take every slot: past either a new connection gets 503 and is closed at once). Idle
   keep-alive connections close after uvicorn's own `timeout_keep_alive`; a request head is at
   most `h11_max_incomplete_event_size` bytes (both set by `uvicorn_settings`).

`authenticate(scope)` is the credentials check: by default auth.authenticate_scope (named API
tokens and console sessions, from the headers and method alone), the same rule the routes
apply; it must be cheap and must not read the body.

Every limit is a named constant here and a key of [api] in the Mixer's configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .auth import authenticate_scope

__all__ = [
    "GuardMiddleware",
    "guarded_protocol",
    "bounded_tls_handshake",
    "uvicorn_settings",
    "UNAUTHENTICATED_BODY_BYTES",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_BODY_TIMEOUT_S",
    "DEFAULT_HEADER_TIMEOUT_S",
    "DEFAULT_KEEPALIVE_TIMEOUT_S",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_CONNECTIONS_PER_CLIENT",
    "DEFAULT_MAX_REQUESTS",
    "MAX_HEAD_BYTES",
    "EXEMPT_FROM_REQUEST_CAP",
    "LINGER_S",
    "LINGER_BYTES",
]

log = logging.getLogger("fluxrig.mixer.api.guard")

# A login form or a small JSON command; anything larger needs credentials first.
UNAUTHENTICATED_BODY_BYTES = 16 * 1024
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 30.0
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_KEEPALIVE_TIMEOUT_S = 5.0
DEFAULT_MAX_CONNECTIONS = 256
# One address cannot take every slot: an operator's client elsewhere still gets in.
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 32
DEFAULT_MAX_REQUESTS = 64
# Request line plus headers (h11's default is 16 KiB too; named here so it is a setting).
MAX_HEAD_BYTES = 16 * 1024
# After refusing a body from its headers: how long and how much of it is read and dropped so
# the client reads our answer instead of a reset.
LINGER_S = 5.0
LINGER_BYTES = 64 * 1024 * 1024
EXEMPT_FROM_REQUEST_CAP = frozenset({"/api/v1/health"})

# scope -> who sent it (None: missing or wrong credentials). Headers and method only.
ScopeAuthenticator = Callable[[dict], object]


class _BodyTooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    pass


async def _respond(send, status: int, message: str, extra: Iterable[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        # The body was not (all) read: this connection cannot carry another request.
        (b"connection", b"close"),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """ASGI middleware: credentials before body, body cap and deadline, in-flight cap."""

    def __init__(
        self,
        app,
        *,
        authenticate: ScopeAuthenticator = authenticate_scope,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        route_limits: Mapping[str, int] | None = None,
        unauthenticated_body_bytes: int = UNAUTHENTICATED_BODY_BYTES,
        body_timeout: float = DEFAULT_BODY_TIMEOUT_S,
        max_requests: int = DEFAULT_MAX_REQUESTS,
        exempt: frozenset[str] = EXEMPT_FROM_REQUEST_CAP,
        on_refused: Callable[[dict, int], None] | None = None,
    ):
        self.app = app
        self.authenticate = authenticate
        self.max_body_bytes = max_body_bytes
        # Longest prefix first, so /api/v1/scenarios/import beats /api/v1.
        self.route_limits = sorted((route_limits or {}).items(), key=lambda kv: -len(kv[0]))
        self.unauthenticated_body_bytes = unauthenticated_body_bytes
        self.body_timeout = body_timeout
        self.max_requests = max_requests
        self.exempt = exempt
        self.in_flight = 0
        self.refused = {"unauthenticated_body": 0, "too_large": 0, "body_timeout": 0, "busy": 0}
        self.on_refused = on_refused  # the audit of refusals (auth.RefusalAudit)

    def _refuse(self, scope, status: int) -> None:
        if self.on_refused is not None:
            try:
                self.on_refused(scope, status)
            except Exception as exc:  # the refusal stands; its audit row is what failed
                log.error("front door: refusal %d of %s not audited: %s", status, scope.get("path", ""), exc)

    def _limit_for(self, path: str) -> int:
        for prefix, limit in self.route_limits:
            if path.startswith(prefix):
                return limit
        return self.max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        exempt = path in self.exempt
        if not exempt and self.in_flight >= self.max_requests:
            self.refused["busy"] += 1
            self._refuse(scope, 503)
            return await _respond(
                send,
                503,
                f"too many requests in flight (api.max_requests={self.max_requests})",
                [(b"retry-after", b"1")],
            )
        headers: dict[str, str] = {}
        for k, v in scope.get("headers", ()):
            # latin-1 never fails on bytes: a header is what the client sent, byte for byte.
            headers[k.decode("latin-1").lower()] = v.decode("latin-1")
        declared = headers.get("content-length")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        try:
            length = int(declared) if declared is not None else None
        except ValueError:
            self._refuse(scope, 400)
            return await _respond(send, 400, "Content-Length is not a number")
        has_body = chunked or bool(length)
        authed = (self.authenticate(scope) is not None) if has_body else True
        if has_body and not authed:
            if chunked or length > self.unauthenticated_body_bytes:
                self.refused["unauthenticated_body"] += 1
                self._refuse(scope, 401)
                return await _respond(
                    send,
                    401,
                    "missing or wrong bearer token (checked before the body is read)",
                    [(b"www-authenticate", b"Bearer")],
                )
        limit = self._limit_for(path) if authed else self.unauthenticated_body_bytes
        if length is not None and length > limit:
            self.refused["too_large"] += 1
            self._refuse(scope, 413)
            return await _respond(send, 413, f"body of {length} bytes exceeds the limit of {limit} bytes")
        started = False
        received = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout

        async def guarded_receive():
            nonlocal received
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise _BodyTimeout
            try:
                message = await asyncio.wait_for(receive(), remaining)
            except TimeoutError:
                raise _BodyTimeout from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        if not exempt:
            self.in_flight += 1
        try:
            await self.app(scope, guarded_receive if has_body else receive, tracked_send)
        except _BodyTooLarge:
            self.refused["too_large"] += 1
            self._refuse(scope, 413)
            if not started:
                await _respond(send, 413, f"body exceeds the limit of {limit} bytes")
        except _BodyTimeout:
            self.refused["body_timeout"] += 1
            self._refuse(scope, 408)
            if not started:
                await _respond(send, 408, f"the body did not arrive within {self.body_timeout:g}s (api.body_timeout)")
        finally:
            if not exempt:
                self.in_flight -= 1


class _LingeringTransport:
    """The transport uvicorn sees. Its close() does not reset a client still sending a body we
    refused (401/413 from the headers): closing a socket with unread data sends RST, and the
    client's kernel drops our answer with it, so the client would see "connection reset"
    instead of the reason. Instead: our side is shut (FIN after the answer), what still arrives
    is read and thrown away for at most LINGER_S or LINGER_BYTES (nginx's lingering close), then
    the socket is closed. Everything else is the real transport's."""

    def __init__(self, real, protocol):
        self._real = real
        self._protocol = protocol
        self.lingering = False

    def __getattr__(self, name):
        return getattr(self._real, name)

    def is_closing(self) -> bool:
        return self.lingering or self._real.is_closing()

    def close(self) -> None:
        if self.lingering or self._real.is_closing():
            return
        if self._protocol.conn.their_state is h11.SEND_BODY and self._real.can_write_eof():
            self.lingering = True
            self._real.resume_reading()
            self._real.write_eof()
            self._protocol.loop.call_later(LINGER_S, self._real.close)
        else:
            self._real.close()


_TIMEOUT_408 = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_BUSY_503 = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\nretry-after: 1\r\n\r\n"


def guarded_protocol(
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a request-head deadline and connection caps, in all and per
    client address (module docstring)."""

    per_client: dict[str, int] = {}

    class GuardedH11Protocol(H11Protocol):
        refused_connections = 0
        head_timeouts = 0
        open_per_client = per_client

        def connection_made(self, transport) -> None:
            self._lingered = 0
            super().connection_made(_LingeringTransport(transport, self))
            self._head_timer = None
            self._peer = self.client[0] if self.client else ""
            per_client[self._peer] = per_client.get(self._peer, 0) + 1
            if len(self.connections) > max_connections or per_client[self._peer] > max_per_client:
                type(self).refused_connections += 1
                transport.write(_BUSY_503)
                transport.close()
                return
            self._arm_head_timer()

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(header_timeout, self._head_timeout)

        def _cancel_head_timer(self) -> None:
            timer = getattr(self, "_head_timer", None)
            if timer is not None:
                timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            # IDLE on their side: the request line and headers are not complete yet.
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                type(self).head_timeouts += 1
                self.transport.write(_TIMEOUT_408)
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self.transport.lingering:  # the rest of a refused body: counted and dropped
                self._lingered += len(data)
                if self._lingered > LINGER_BYTES:
                    self.transport._real.close()
                return
            super().data_received(data)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:
                self._cancel_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                # The next request's head gets the same deadline (idle time before its first
                # byte is the keep-alive timeout's business; both may fire, the first wins).
                self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            peer = getattr(self, "_peer", None)
            if peer is not None:
                left = per_client.get(peer, 1) - 1
                if left > 0:
                    per_client[peer] = left
                else:
                    per_client.pop(peer, None)
                self._peer = None
            super().connection_lost(exc)

    return GuardedH11Protocol


@contextlib.contextmanager
def bounded_tls_handshake(loop: asyncio.AbstractEventLoop, timeout: float):
    """While uvicorn starts its listeners, every TLS listener gets `ssl_handshake_timeout`.

    uvicorn passes none, so asyncio's 60 s applies, and a connection still in its handshake is
    not yet the guard's (its protocol sees `connection_made` only once TLS is up): 200 clients
    that open TLS and stop would each hold a socket for a minute, uncounted. The handshake is
    part of the request head, so it gets the head's deadline (`api.header_timeout`). The hook
    lives only for the duration of `startup()`, on this loop object."""
    real = loop.create_server

    async def create_server(*args, **kwargs):
        if kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_handshake_timeout", timeout)
        return await real(*args, **kwargs)

    loop.create_server = create_server
    try:
        yield
    finally:
        del loop.create_server


def uvicorn_settings(api_cfg) -> dict:
    """uvicorn.Config keyword arguments for the guard's limits, from the [api] section."""
    return {
        "http": guarded_protocol(api_cfg.header_timeout, api_cfg.max_connections, api_cfg.max_connections_per_client),
        "timeout_keep_alive": api_cfg.keepalive_timeout,
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
        # uvicorn's own cap counts connections and tasks: set above ours so ours answers first.
        "limit_concurrency": api_cfg.max_connections + api_cfg.max_requests + 1,
    }
