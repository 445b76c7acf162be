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
from collections.abc import Iterator

import grpc
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..tls import ServerTls, subject_of
from .app import create_app

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


class _TlsHttpProtocol(HttpToolsProtocol):
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
    app, host: str, port: int, grace: float, tls: ServerTls | None = None
) -> uvicorn.Config:
    tls_options = {} if tls is None else {
        # Called by uvicorn inside the serving loop: the context is reloaded there.
        "ssl_context_factory": lambda _config, _default: tls.rest_context(
            asyncio.get_running_loop()
        ),
        "http": _TlsHttpProtocol,
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
        **tls_options,
    )


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
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
    """The shim served by uvicorn on its own thread and event loop.

    With `tls` it serves HTTPS only (and requires client certificates when `tls`
    has a client CA); `channel_credentials` secure its own channel to gRPC.
    """

    def __init__(
        self,
        grpc_target: str,
        host: str,
        port: int,
        *,
        tls: ServerTls | None = None,
        channel_credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.grpc_target = grpc_target
        self.host = host
        self.port = port
        self.tls = tls
        self.channel_credentials = channel_credentials
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Binds (port 0 picks a free port, then `self.port` is the real one) and serves.

        With `loop` (a running loop on another thread: the gRPC server's), the shim
        is served there instead of on a thread and loop of its own, so a REST call
        and the gRPC call it makes never hop between two event loops.
        """
        sock = _bind(self.host, self.port)
        self.port = sock.getsockname()[1]
        app = create_app(self.grpc_target, channel_credentials=self.channel_credentials)
        server = _Server(_config(app, self.host, self.port, 5.0, self.tls))
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
        log.info("serving REST", extra={"port": self.port, "grpc_target": self.grpc_target})

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
) -> None:
    """Serves the shim in the foreground until SIGINT/SIGTERM, then drains and returns.

    With `tls`, SIGHUP re-reads the certificates.
    """
    sock = _bind(host, port)
    app = create_app(grpc_target, channel_credentials=channel_credentials)
    server = _Server(_config(app, host, sock.getsockname()[1], 5.0, tls))
    server.reload_on_hangup = tls
    log.info("REST shim on %s:%d -> gRPC %s", host, sock.getsockname()[1], grpc_target)
    try:
        server.run(sockets=[sock])  # uvicorn handles the signals on the main thread
    finally:
        sock.close()
