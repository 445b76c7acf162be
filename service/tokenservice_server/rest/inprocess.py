"""Calling the gRPC server's own wrapped handlers from the REST shim, in the server's process.

Under `tokenservice serve` the shim and the gRPC server share one process and
one event loop. Rather than a loopback gRPC call (a client call, then the whole
server-side call again), the shim awaits the very closures the gRPC server runs
for each method (`RpcInterceptor.unary`), so the log line, metrics, caller
policy, narrowing settle, rate limits and error mapping are the server's own.
Each gets an `HttpCallContext`: the few ServicerContext methods the servicer,
the interceptor and the health servicer call, built from the HTTP request.

What the loopback hop used to bound is bounded here too: at most
`max_concurrent` calls in flight (the gRPC server's streams per connection,
which capped the shim's one channel), requests no larger than the server
accepts, and the shim's deadline around the wait for a place and the call.
One client (an address; for IPv6 its /64) holds at most a quarter of the
places: more is refused at once (RESOURCE_EXHAUSTED, REST 429) rather than
queued, so one client's flood cannot make everyone else wait. The health
check takes no place: a full house is no reason to report the service down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE_NAME

from tokenservice_client import ip_address

from ..errors import RateLimited
from ..grpc_api import status_for
from ..throttle import client_keys

Handler = Callable[[Any, Any], Awaitable[Any]]
Metadata = tuple[tuple[str, str | bytes], ...]

HEALTH_CHECK = f"/{HEALTH_SERVICE_NAME}/Check"

# What the gRPC client library says for these, so a failure reads the same either way.
DEADLINE_DETAILS = "Deadline Exceeded"
# One client's share of the places: at most 1/PER_CLIENT_SHARE of them.
PER_CLIENT_SHARE = 4
CLIENT_BUSY = "too many calls in flight from this client; retry once some have answered"


class RpcFailure(grpc.aio.AbortError):
    """A failed in-process call, read by the shim exactly as it reads a failed gRPC call.

    A grpc.aio.AbortError, as `context.abort()` raises on the server, so the
    interceptor treats it as it treats its own aborts; `code()`, `details()` and
    `trailing_metadata()` as on grpc.aio.AioRpcError, for `from_rpc_error`.
    """

    def __init__(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()
    ) -> None:
        super().__init__(code.name, details)
        self._code = code
        self._details = details
        self._trailing = trailing_metadata

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Metadata:
        return self._trailing


def peer_of(client: Any) -> str:
    """The HTTP client's socket address as grpcio spells a peer (`ipv4:192.0.2.7:5000`).

    The shim passes no x-forwarded-for in process: the peer is the client itself,
    and an X-Forwarded-For header the client sent is never read (as before, when
    the shim replaced it with the socket's address). Without an IP address (an
    ASGI server on a Unix socket) it is a Unix peer, all such clients one.
    """
    if client is None or not client[0]:
        return "unix:"
    address = ip_address(client[0])
    if address is None:
        return "unix:"
    port = client[1] if client[1] is not None else 0
    return f"ipv6:[{address}]:{port}" if ":" in address else f"ipv4:{address}:{port}"


class HttpCallContext:
    """The ServicerContext of one REST request's call: only what the handlers use.

    The interceptor reads the metadata (authorization), the peer, and the code
    after an abort; the servicer sets trailing metadata (a cache budget); the
    health servicer aborts with NOT_FOUND. Anything else is an AttributeError,
    which the interceptor logs and answers as INTERNAL: a handler reaching for
    a method this adapter lacks fails loudly, in the tests first.
    """

    __slots__ = ("_auth", "_code", "_deadline", "_metadata", "_peer", "_trailing")

    def __init__(
        self, metadata: Metadata, peer: str, subject: str | None, deadline: float
    ) -> None:
        self._metadata = metadata
        self._peer = peer
        # The verified client certificate's subject, where a gRPC caller's own TLS
        # handshake puts it (tls.peer_subject reads it there).
        self._auth: dict[str, list[bytes]] = (
            {"x509_subject": [subject.encode("utf-8")]} if subject else {}
        )
        self._deadline = deadline  # time.monotonic() at which the call is over
        self._code: grpc.StatusCode | None = None
        self._trailing: Metadata = ()

    def invocation_metadata(self) -> Metadata:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def time_remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, Any]]) -> None:
        self._trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> Metadata:
        return self._trailing

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """Ends the call with `code`, as grpc.aio's abort does (its trailing metadata,
        else what was set before)."""
        if code == grpc.StatusCode.OK:
            raise ValueError("abort() needs a status other than OK")
        self._code = code
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise RpcFailure(code, details, self._trailing)


@dataclass
class LocalHandlers:
    """The gRPC server's wrapped unary handlers by method path, and its limits on a call.

    `max_concurrent` is the server's streams per connection, which bounded the
    shim's calls when it dialed the server over one channel; `max_message_bytes`
    the largest request the server accepts.
    """

    handlers: Mapping[str, Handler]
    max_concurrent: int
    max_message_bytes: int
    _slots: asyncio.Semaphore = field(init=False, repr=False)
    _in_flight: dict[str, int] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.max_concurrent)
        self.per_client = max(1, self.max_concurrent // PER_CLIENT_SHARE)

    def in_flight(self, client: str) -> int:
        """Calls of this client (its /64 for IPv6) running or waiting for a place."""
        return self._in_flight.get(_client_key(client), 0)

    async def call(
        self, path: str, message: Any, metadata: Metadata, peer: str, subject: str | None,
        timeout: float, client: str = "",
    ) -> Any:
        """The handler's reply; RpcFailure with the status a gRPC caller would get.

        `client` is the HTTP client's address, whose share of the places the call
        takes; the health check passes none and takes no place.
        """
        if not client:
            return await self._run(path, message, metadata, peer, subject, timeout, None)
        key = _client_key(client)
        held = self._in_flight.get(key, 0)
        if held >= self.per_client:
            status = status_for(RateLimited(CLIENT_BUSY, 1.0))
            raise RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, CLIENT_BUSY,
                             tuple(status.trailing_metadata))
        self._in_flight[key] = held + 1
        try:
            return await self._run(path, message, metadata, peer, subject, timeout, self._slots)
        finally:
            left = self._in_flight.pop(key) - 1
            if left:
                self._in_flight[key] = left

    async def _run(
        self, path: str, message: Any, metadata: Metadata, peer: str, subject: str | None,
        timeout: float, slots: asyncio.Semaphore | None,
    ) -> Any:
        handler = self.handlers[path]  # a route without a handler is a bug: KeyError
        if timeout <= 0:
            raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, DEADLINE_DETAILS)
        size = message.ByteSize()
        if size > self.max_message_bytes:
            raise RpcFailure(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"SERVER: Received message larger than max ({size} vs. {self.max_message_bytes})",
            )
        end = time.monotonic() + timeout
        context = HttpCallContext(metadata, peer, subject, end)
        try:
            async with asyncio.timeout(timeout):
                if slots is None:
                    reply = await handler(message, context)
                else:
                    async with slots:
                        reply = await handler(message, context)
        except TimeoutError:
            raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, DEADLINE_DETAILS) from None
        if time.monotonic() >= end:
            # Done without once yielding to the loop, past its deadline: a gRPC caller
            # would not have had this reply in time either.
            raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, DEADLINE_DETAILS)
        return reply


def _client_key(client: str) -> str:
    """What one client's share is counted by: its address, or its IPv6 /64."""
    return client_keys(client)[-1]
