"""An event loop's own connection to Redis: commands pipelined, replies matched in order.

redis-py's asyncio client takes a connection from a pool per command and
builds and parses it in Python; the rate limiter sends one script a loop turn
and wants it answered without a thread or a pool. This is the least that
does: commands written back to back on one connection, replies parsed by
hiredis (redis-py's own C parser) and handed to the waiting futures in order.
A command not answered within `timeout_s` closes the connection (the replies
after it would be late too) and fails every command waiting on it; the next
command opens a new one.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any

import hiredis
from redis.connection import SSLConnection, parse_url


class RedisUnanswered(ConnectionError):
    """The connection broke, or Redis did not answer in time."""


class RedisReplyError(RuntimeError):
    """Redis answered with an error (NOSCRIPT, a script error, WRONGTYPE, ...)."""


def pack(args: tuple[bytes | str | int | float, ...]) -> bytes:
    """One command in RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int):
            data = b"%d" % arg
        else:
            data = repr(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Protocol(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self._loop = loop
        self._timeout_s = timeout_s
        self._reader = hiredis.Reader()
        self._waiting: deque[tuple[asyncio.Future[Any], asyncio.TimerHandle]] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if not self._waiting:
                break  # nothing asked: a protocol error; connection_lost sorts it out
            future, timer = self._waiting.popleft()
            timer.cancel()
            if future.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(RedisReplyError(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(RedisUnanswered(f"the connection to Redis closed: {exc or 'by Redis'}"))

    def _fail(self, error: Exception) -> None:
        while self._waiting:
            future, timer = self._waiting.popleft()
            timer.cancel()
            if not future.done():
                future.set_exception(error)

    def _stalled(self) -> None:
        self._fail(RedisUnanswered(f"Redis did not answer within {self._timeout_s} s"))
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def call(self, *args: bytes | str | int | float) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self._loop.create_future()
        if self.closed or self.transport is None:
            future.set_exception(RedisUnanswered("the connection to Redis is closed"))
            return future
        timer = self._loop.call_later(self._timeout_s, self._stalled)
        self._waiting.append((future, timer))
        self.transport.write(pack(args))
        return future


class RedisPipe:
    """One pipelined connection to the Redis at `url`, for the event loop that opened it."""

    def __init__(self, url: str, timeout_s: float) -> None:
        options = parse_url(url)
        self._host = options.get("host") or "localhost"
        self._port = int(options.get("port") or 6379)
        self._db = int(options.get("db") or 0)
        self._username = options.get("username")
        self._password = options.get("password")
        self._tls = options.get("connection_class") is SSLConnection
        self.timeout_s = timeout_s
        self.loop: asyncio.AbstractEventLoop | None = None
        self._protocol: _Protocol | None = None
        self._opening: asyncio.Future[_Protocol] | None = None

    async def call(self, *args: bytes | str | int | float) -> Any:
        """Sends one command and waits for its reply; RedisUnanswered or RedisReplyError."""
        protocol = self._protocol
        if protocol is None or protocol.closed or self.loop is not asyncio.get_running_loop():
            protocol = await self._open()
        return await protocol.call(*args)

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        if self.loop is not loop:  # a new loop: nothing of the old one is usable
            self.loop, self._protocol, self._opening = loop, None, None
        if self._opening is None:
            self._opening = loop.create_task(self._connect(loop))
        opening = self._opening
        try:
            protocol = await asyncio.shield(opening)
        finally:
            if opening.done() and self._opening is opening:
                self._opening = None
        self._protocol = protocol
        return protocol

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Protocol:
        async def connect() -> _Protocol:
            context = ssl.create_default_context() if self._tls else None
            _, protocol = await loop.create_connection(
                lambda: _Protocol(loop, self.timeout_s), self._host, self._port, ssl=context
            )
            if self._password is not None:
                auth = (self._username, self._password) if self._username else (self._password,)
                await protocol.call("AUTH", *auth)
            if self._db:
                await protocol.call("SELECT", self._db)
            return protocol

        try:
            return await asyncio.wait_for(connect(), self.timeout_s)
        except (TimeoutError, OSError) as error:
            raise RedisUnanswered(f"cannot connect to Redis: {error!r}") from error

    def close(self) -> None:
        """Closes the connection; from any thread (on the loop's own when it runs)."""
        protocol, loop, self._protocol = self._protocol, self.loop, None
        if protocol is None or loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop or not loop.is_running():
            protocol.close()
        else:
            loop.call_soon_threadsafe(protocol.close)
