"""Serving the shim with uvicorn: in a background thread beside the gRPC server, or alone.

uvicorn because it is the reference ASGI server: HTTP/1.1 keep-alive, one event
loop in which every request awaits its gRPC call without blocking the others
(grpc.aio), bounded graceful shutdown, and nothing to install beyond a pure
Python wheel. Access logs are off: a URL may carry what a client should not
have put there, and the shim never logs request data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..config import Config
from ..tls import ServerTls, subject_of
from .app import create_app
from .inprocess import LocalHandlers

log = logging.getLogger("tokenservice.rest")

_START_TIMEOUT_S = 30.0


class _Server(uvicorn.Server):
    """uvicorn's server, except that a stop signal ends it cleanly.

    uvicorn re-raises a captured SIGTERM/SIGINT once it has shut down, so the
    process would die of the signal; `tokenservice rest` should drain and exit 0.
    When serving TLS in the foreground, SIGHUP re-reads the certificates.
    """

    reload_on_hangup: ServerTls | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {
            sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        if self.reload_on_hangup is not None:
            tls = self.reload_on_hangup
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: tls.reload())
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


# Request line and headers of one request, at most (a client sending more is
# refused with 431 before it is read any further).
MAX_HEADER_BYTES = 64 * 1024
_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"
            b"Content-Length: 0\r\nRetry-After: 1\r\n\r\n")


@dataclass(frozen=True, slots=True)
class RestLimits:
    """What an idle, slow or greedy client may hold of the shim.

    Without them a client could open connections and send half a request on each
    until the process ran out of file descriptors, taking gRPC down with it.
    """

    # Connections open at once, TLS handshakes included; more are closed at once
    # (plain HTTP is told 503 first).
    max_connections: int = 512
    # From a request's first byte until its headers are complete.
    header_timeout: float = 10.0
    # From the headers until the last byte of the body.
    body_timeout: float = 10.0
    # A connection waiting for a request: before its first one and between two.
    idle_timeout: float = 5.0

    @classmethod
    def from_config(cls, config: Config) -> RestLimits:
        return cls(
            max_connections=config.rest_max_connections,
            header_timeout=config.rest_header_timeout_seconds,
            body_timeout=config.rest_body_timeout_seconds,
            idle_timeout=config.rest_idle_timeout_seconds,
        )


class _ConnectionCap:
    """Counts the shim's open connections; a connection takes a place or is refused."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self._lock = threading.Lock()
        self._refused = 0
        self._reported_at = -1.0

    def take(self) -> bool:
        with self._lock:
            if self.open >= self.limit:
                return False
            self.open += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.open -= 1

    def refused(self) -> int:
        """Counts a refusal; returns the refusals to report now (at most once a
        second, so a flood of connections is not a flood of log lines), else 0."""
        with self._lock:
            self._refused += 1
            now = time.monotonic()
            if now - self._reported_at < 1.0:
                return 0
            count, self._refused, self._reported_at = self._refused, 0, now
            return count


class _CountedSocket(socket.socket):
    """An accepted connection that gives its place back when it is closed, however
    it ends (a normal close, a reset, a failed TLS handshake)."""

    def __init__(self, *args: Any, cap: _ConnectionCap, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cap: _ConnectionCap | None = cap

    def close(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.give_back()
        super().close()


class _ListeningSocket(socket.socket):
    """The shim's listening socket: accept() hands out at most `cap.limit` open
    connections, and closes any more as soon as they arrive.

    asyncio's event loop accepts through this method, before any TLS handshake
    or HTTP parsing, so the cap holds whatever a client does or does not send.
    """

    _cap: _ConnectionCap
    _refusal: bytes

    def accept(self) -> tuple[socket.socket, Any]:
        fd, address = self._accept()  # type: ignore[attr-defined]
        if self._cap.take():
            conn = _CountedSocket(self.family, self.type, self.proto, fileno=fd, cap=self._cap)
            return conn, address
        with socket.socket(self.family, self.type, self.proto, fileno=fd) as refused:
            refused.setblocking(False)
            with contextlib.suppress(OSError):
                if self._refusal:
                    refused.send(self._refusal)  # a fresh socket: its buffer takes it
                # What the client already sent is read first: closing over unread
                # bytes resets the connection, and the client might not see the 503.
                for _ in range(4):
                    if not refused.recv(65536):
                        break
        count = self._cap.refused()
        if count:
            log.warning("REST connections refused: too many open",
                        extra={"limit": self._cap.limit, "refused": count})
        # asyncio's accept loop ends its round on this, and comes back for more.
        raise ConnectionAbortedError("too many REST connections")


class _HeadersTooLarge(Exception):
    """Raised from a parser callback to stop parsing a request refused with 431."""


class _GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with deadlines a slow client cannot stretch.

    uvicorn's keep-alive timer starts only after a first response and stops at
    any byte received, so a client sending nothing, or a header a byte at a
    time, held its connection forever. Here each phase has a deadline that data
    does not extend: waiting for a request (idle), reading its headers, reading
    its body. When one passes the connection is closed (with a 408 while the
    headers were still coming). Headers larger than MAX_HEADER_BYTES get a 431.
    """

    limits: RestLimits = RestLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase = "idle"
        self._header_bytes = 0
        self._parsed_header_bytes = 0

    def _arm(self, phase: str, seconds: float) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._phase = phase
        self._deadline = self.loop.call_later(seconds, self._expired) if seconds else None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport is None or self.transport.is_closing():
            return
        if self._phase == "headers":
            self._refuse(b"408 Request Timeout")
        else:
            self.transport.close()

    def _refuse(self, status: bytes) -> None:
        self.transport.write(b"HTTP/1.1 " + status + b"\r\nConnection: close\r\n"
                             b"Content-Length: 0\r\n\r\n")
        self.transport.close()

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        super().connection_made(transport)
        self._arm("idle", self.limits.idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)

    def _headers_too_large(self) -> None:
        self._arm("closed", 0)
        self._refuse(b"431 Request Header Fields Too Large")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Headers the parser holds unfinished: counted by the chunk while they are
        # still incomplete after it (a chunk that completes them may carry body).
        if self._phase in ("idle", "headers") and not self.transport.is_closing():
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._headers_too_large()

    def _parsed(self, size: int) -> None:
        """Headers parsed whole: counted exactly, however they were chunked."""
        self._parsed_header_bytes += size
        if self._parsed_header_bytes > MAX_HEADER_BYTES:
            self._headers_too_large()
            raise _HeadersTooLarge  # stops the parser; what uvicorn answers goes nowhere

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._parsed_header_bytes = 0
        self._arm("headers", self.limits.header_timeout)

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._parsed(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._parsed(len(name) + len(value) + 4)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._header_bytes = 0
        self._arm("body", self.limits.body_timeout)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._arm("app", 0)  # the app's own deadline (the gRPC call's) bounds it now

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline and self._phase == "app":
            self._arm("idle", self.limits.idle_timeout)


class _TlsHttpProtocol(_GuardedHttpProtocol):
    """uvicorn's HTTP/1.1 protocol, plus the client certificate's subject in the scope.

    uvicorn does not fill in the ASGI TLS extension; this sets its
    `client_cert_name`, read once per connection (the handshake is over by
    connection_made), so the app can name the caller's certificate to gRPC.
    """

    _tls: dict[str, str] | None = None

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        subject = subject_of(ssl_object.getpeercert()) if ssl_object is not None else None
        self._tls = {"client_cert_name": subject} if subject else None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls is not None:
            self.scope["extensions"] = {"tls": dict(self._tls)}  # type: ignore[typeddict-unknown-key]


def _config(
    app,
    host: str,
    port: int,
    grace: float,
    tls: ServerTls | None = None,
    limits: RestLimits | None = None,
) -> uvicorn.Config:
    limits = limits or RestLimits()
    # The limits travel as class attributes: uvicorn builds the protocol itself.
    protocol = type("HttpProtocol", (_TlsHttpProtocol if tls else _GuardedHttpProtocol,),
                    {"limits": limits})
    tls_options = {} if tls is None else {
        # Called by uvicorn inside the serving loop: the context is reloaded there.
        "ssl_context_factory": lambda _config, _default: tls.rest_context(
            asyncio.get_running_loop()
        ),
    }
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        log_config=None,  # the application configures logging, not uvicorn
        access_log=False,
        server_header=False,
        # The client address is the TCP peer: X-Forwarded-For from a caller is
        # not trusted, so nobody can dodge the per-address throttle with it.
        proxy_headers=False,
        timeout_graceful_shutdown=max(1, round(grace)),
        http=protocol,
        timeout_keep_alive=max(1, round(limits.idle_timeout)),
        # asyncio's own loop: the connection cap relies on its calling the listening
        # socket's accept() (uvloop would accept in C, past it).
        loop="asyncio",
        **tls_options,
    )


def _bind(
    host: str, port: int, limits: RestLimits | None = None, tls: bool = False
) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = _ListeningSocket(family, kind, proto)
    sock._cap = _ConnectionCap((limits or RestLimits()).max_connections)
    sock._refusal = b"" if tls else _REFUSED
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class RestServer:
    """The shim served by uvicorn on its own thread and event loop, or on the gRPC server's.

    With `tls` it serves HTTPS only (and requires client certificates when `tls`
    has a client CA); `channel_credentials` secure its own channel to gRPC.
    With `local` (the gRPC server's handlers) it calls them in process, and must
    then be started on the server's loop; grpc_target is then not dialed.
    """

    def __init__(
        self,
        grpc_target: str | None,
        host: str,
        port: int,
        *,
        tls: ServerTls | None = None,
        channel_credentials: grpc.ChannelCredentials | None = None,
        limits: RestLimits | None = None,
        local: LocalHandlers | None = None,
        metrics: bool = True,
    ) -> None:
        self.grpc_target = grpc_target
        self.local = local
        self.metrics = metrics
        self.host = host
        self.port = port
        self.tls = tls
        self.limits = limits or RestLimits()
        self.channel_credentials = channel_credentials
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Binds (port 0 picks a free port, then `self.port` is the real one) and serves.

        With `loop` (a running loop on another thread: the gRPC server's), the shim
        is served there instead of on a thread and loop of its own, so a REST call
        and the gRPC call it makes never hop between two event loops. With `local`
        it must be: the handlers run on the loop the gRPC server runs them on.
        """
        if self.local is not None and loop is None:
            raise ValueError("an in-process shim runs on the gRPC server's event loop")
        sock = _bind(self.host, self.port, self.limits, tls=self.tls is not None)
        self.port = sock.getsockname()[1]
        app = create_app(self.grpc_target, channel_credentials=self.channel_credentials,
                         local=self.local, metrics=self.metrics)
        server = _Server(_config(app, self.host, self.port, 5.0, self.tls, self.limits))
        self._server = server
        ready = threading.Event()

        async def serve() -> None:
            try:
                await server.serve(sockets=[sock])
            except BaseException as exc:  # SystemExit when lifespan start-up fails
                self._error = exc
            finally:
                sock.close()
                ready.set()

        def run() -> None:
            if loop is None:
                asyncio.run(serve())
            else:
                asyncio.run_coroutine_threadsafe(serve(), loop).result()

        self._thread = threading.Thread(target=run, name=f"rest-{self.port}", daemon=True)
        self._thread.start()
        while not ready.wait(0.01):
            if server.started:
                break
            if not self._thread.is_alive():
                break
        if not server.started:
            self._thread.join(_START_TIMEOUT_S)
            raise RuntimeError(f"the REST shim failed to start: {self._error!r}")
        log.info("serving REST", extra={
            "port": self.port,
            "grpc_target": "in process" if self.local is not None else self.grpc_target,
        })

    def stop(self, grace: float = 5.0) -> None:
        """Stops accepting, lets in-flight requests finish (up to grace seconds), closes."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.config.timeout_graceful_shutdown = max(1, round(grace))
        server.should_exit = True
        thread.join(grace + 5.0)
        if thread.is_alive():
            server.force_exit = True
            thread.join(5.0)
        self._server = self._thread = None


def run_rest(
    grpc_target: str,
    host: str,
    port: int,
    *,
    tls: ServerTls | None = None,
    channel_credentials: grpc.ChannelCredentials | None = None,
    limits: RestLimits | None = None,
    metrics: bool = True,
) -> None:
    """Serves the shim in the foreground until SIGINT/SIGTERM, then drains and returns.

    With `tls`, SIGHUP re-reads the certificates.
    """
    sock = _bind(host, port, limits, tls=tls is not None)
    app = create_app(grpc_target, channel_credentials=channel_credentials, metrics=metrics)
    server = _Server(_config(app, host, sock.getsockname()[1], 5.0, tls, limits))
    server.reload_on_hangup = tls
    log.info("REST shim on %s:%d -> gRPC %s", host, sock.getsockname()[1], grpc_target)
    try:
        server.run(sockets=[sock])  # uvicorn handles the signals on the main thread
    finally:
        sock.close()
