"""PostgreSQL reads on the event loop itself: psycopg2 asynchronous connections, a small pool.

Authenticate's one indexed read is the hot path. Sent to a worker thread it
pays a thread hand-off and a wake-up of the loop on every call; here the loop
sends the query and goes on serving other calls until the socket is readable,
with no thread in between. The pool keeps db.py's promises on its own terms:

- at most `max_connections` connections, opening ones included; callers beyond
  them wait in line (for `WAIT_SECONDS` at most) for the next one handed back;
- every connection watches its socket while idle, so one the server closed (a
  restart, a DBA killing backends) is dropped before anyone checks it out, at
  no cost per call; a connection that fails a query is closed for real and,
  when the failure is the connection's own (lost, or no answer in time), every
  connection opened before it goes too: idle ones at once, those in use when
  they come back;
- the server ends a statement after `db.STATEMENT_TIMEOUT_MS`; a client-side
  timer one second later covers a server that does not answer at all;
- connecting, host name lookup included, is asynchronous and bounded by the
  URL's connect timeout (libpq does not apply it to asynchronous connections);
- any failure becomes `Unavailable` with db.py's one fixed message, and the next
  call simply opens a new connection: recovery needs nothing else.

Each statement is prepared once per connection (PREPARE), so PostgreSQL plans
it once rather than on every call. The pool is used only from the event loop it
first ran on; it is not thread-safe, and needs no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psycopg2
import psycopg2.extensions as ext

from . import db as dbmod
from .errors import Unavailable

log = logging.getLogger("tokenservice.db")

# Longest a call waits for a connection when every one is in use.
WAIT_SECONDS = 10.0
# How much longer than the server's statement timeout the client waits for an
# answer before it gives the connection up as lost.
CLIENT_TIMEOUT_MARGIN_SECONDS = 1.0
# Shown in pg_stat_activity after the application name, so a DBA can tell
# these connections from the service's others.
APPLICATION_SUFFIX = " auth-read"

_POLL_OK = ext.POLL_OK
_POLL_READ = ext.POLL_READ
_POLL_WRITE = ext.POLL_WRITE


class _NoAnswer(Exception):
    """The server did not answer a statement within the client-side timeout."""


class _Connection:
    """One asynchronous connection, its socket watched by the loop while it is open."""

    __slots__ = ("raw", "fd", "cursor", "opened_at", "waiter", "writing", "watched",
                 "dead", "in_use")

    def __init__(self, raw: Any, opened_at: float) -> None:
        self.raw = raw
        self.fd: int = raw.fileno()
        self.cursor: Any = None
        self.opened_at = opened_at
        # The caller's future while a statement runs; None when nothing is asked.
        self.waiter: asyncio.Future[None] | None = None
        self.writing = False  # a writer callback is registered (a query not yet sent whole)
        self.watched = False  # a reader callback is registered
        self.dead = False  # the connection failed: close it, never reuse it
        self.in_use = False


class ReadPool:
    """A bounded pool of asynchronous psycopg2 connections for a few named read statements.

    `statements` maps a name to its SQL with psycopg2's `%s` placeholders; each
    is prepared on every connection when it opens, and `fetchone(name, args)`
    runs it. `params` are psycopg2.connect keyword arguments (db.postgres_params).
    """

    def __init__(self, params: Mapping[str, Any], max_connections: int,
                 statements: Mapping[str, str],
                 on_lost: Callable[[], None] | None = None) -> None:
        if max_connections < 1:
            raise ValueError("a pool needs at least one connection")
        self._params = dict(params)
        self._params["application_name"] = (
            str(self._params.get("application_name") or "tokenservice") + APPLICATION_SUFFIX
        )
        self._connect_timeout = float(self._params.pop("connect_timeout", 5) or 5)
        self._statement_timeout = (
            dbmod.STATEMENT_TIMEOUT_MS / 1000 + CLIENT_TIMEOUT_MARGIN_SECONDS
        )
        self._max = max_connections
        self._prepare = [
            f"PREPARE {name} AS {_numbered(sql)}" for name, sql in statements.items()
        ]
        self._execute = {
            name: f"EXECUTE {name}({', '.join(['%s'] * sql.count('%s'))})"
            if "%s" in sql else f"EXECUTE {name}"
            for name, sql in statements.items()
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: deque[_Connection] = deque()
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._open = 0  # connections open or opening: never more than _max
        self._lost_at = float("-inf")
        self._closed = False
        # Called (on the loop; it must not block) when this pool finds the server
        # gone: the service's other pools presume their connections lost too.
        self._on_lost = on_lost

    @property
    def connections(self) -> int:
        """Connections open or being opened right now."""
        return self._open

    # The one public call.

    async def fetchone(self, name: str, args: Sequence[Any]) -> tuple[Any, ...] | None:
        """Runs statement `name` with `args` and returns its first row (or None).

        Raises Unavailable (db.py's fixed message) for every database failure;
        cancellation (the caller's deadline) closes the connection it held.
        """
        sql = self._execute[name]
        try:
            conn = await self._acquire()
        except (psycopg2.Error, OSError, _NoAnswer) as e:
            # OSError covers a failed host lookup and an expired connect (TimeoutError).
            raise Unavailable(dbmod.UNAVAILABLE_MESSAGE) from e
        try:
            await self._run(conn, sql, args)
            row = conn.cursor.fetchone()
        except BaseException as e:
            self._fail(conn, lost=isinstance(e, _NoAnswer))
            if isinstance(e, (psycopg2.Error, _NoAnswer)):
                raise Unavailable(dbmod.UNAVAILABLE_MESSAGE) from e
            raise
        self._release(conn)
        return row

    async def aclose(self) -> None:
        """Closes every idle connection now and the others when they come back (shutdown)."""
        self._closed = True
        while self._idle:
            self._close(self._idle.pop())
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(_NoAnswer("the pool is closed"))

    # Checking out and back.

    async def _acquire(self) -> _Connection:
        loop = self._bind()
        while True:
            if self._closed:
                raise _NoAnswer("the pool is closed")
            while self._idle:
                conn = self._idle.pop()  # the most recent: its pages and plan are warm
                if self._reusable(conn):
                    conn.in_use = True
                    return conn
                self._close(conn)
            if self._open < self._max:
                self._open += 1
                try:
                    conn = await self._connect(loop)
                except BaseException:
                    self._open -= 1
                    self._wake()
                    raise
                conn.in_use = True
                return conn
            handed = await self._wait(loop)
            if handed is not None:
                if self._reusable(handed):
                    return handed
                handed.in_use = False  # lost while it was on its way: try again
                self._close(handed)
                continue
            # None: a slot came free; go round and open a connection in it.

    async def _wait(self, loop: asyncio.AbstractEventLoop) -> _Connection | None:
        """Waits in line for a connection handed back (or None: a slot came free)."""
        waiter: asyncio.Future[_Connection | None] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_later(WAIT_SECONDS, _expire, waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            # Handed a connection in the same turn the caller gave up: pass it on.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                handed = waiter.result()
                if handed is not None:
                    self._release(handed)
                else:
                    self._wake()
            raise
        finally:
            timer.cancel()

    def _reusable(self, conn: _Connection) -> bool:
        return (
            not conn.dead
            and not conn.raw.closed
            and conn.opened_at > self._lost_at
            and time.monotonic() - conn.opened_at < dbmod.STALE_SECONDS
        )

    def _release(self, conn: _Connection) -> None:
        """A connection back from a caller: to the next in line, to the idle ones, or closed."""
        conn.in_use = False
        if self._closed or not self._reusable(conn):
            self._close(conn)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                conn.in_use = True
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    def _wake(self) -> None:
        """A slot came free: the first caller in line may open a connection in it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _close(self, conn: _Connection) -> None:
        """Closes a connection for real and frees its slot."""
        self._unwatch(conn)
        conn.dead = True
        with contextlib.suppress(Exception):  # already closed by the driver
            conn.raw.close()
        self._open -= 1
        self._wake()

    def _fail(self, conn: _Connection, lost: bool) -> None:
        """A statement failed: the connection goes; if it was the connection's own
        failure (lost, or no answer), every connection opened before it goes too."""
        lost = lost or conn.dead or bool(conn.raw.closed)
        if not lost:
            try:
                lost = conn.raw.get_transaction_status() == ext.TRANSACTION_STATUS_UNKNOWN
            except Exception:
                lost = True
        conn.in_use = False
        self._close(conn)
        if lost:
            self._mark_lost()

    def _mark_lost(self) -> None:
        """The server went away: every connection opened until now is presumed dead."""
        now = time.monotonic()
        if now - self._lost_at > 1.0:  # one line per loss, not one per connection
            log.warning("lost the database connection; reconnecting on the next request")
        self._lost_at = now
        while self._idle:
            self._close(self._idle.pop())
        if self._on_lost is not None:
            self._on_lost()

    # Connecting.

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("a ReadPool serves the one event loop it first ran on")
        return loop

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        """Opens, sets up and watches one connection, all within the connect timeout."""
        async with asyncio.timeout(self._connect_timeout):
            params = await _resolved(loop, self._params)
            raw = psycopg2.connect(async_=1, **params)
            conn: _Connection | None = None
            try:
                await _connected(loop, raw)
                conn = _Connection(raw, time.monotonic())
                conn.cursor = raw.cursor()
                self._watch(conn)
                for sql in self._prepare:
                    await self._run(conn, sql, None)
            except BaseException:
                if conn is not None:
                    self._unwatch(conn)
                raw.close()
                raise
        return conn

    # Running a statement.

    async def _run(self, conn: _Connection, sql: str, args: Sequence[Any] | None) -> None:
        """Sends one statement and waits, on the loop, for its result."""
        loop = self._loop
        assert loop is not None
        try:
            conn.cursor.execute(sql, args)
        except BaseException:
            if conn.raw.closed:
                self._unwatch(conn)  # the driver closed the socket: its number may be reused
                conn.dead = True
            raise
        waiter: asyncio.Future[None] = loop.create_future()
        conn.waiter = waiter
        timer = loop.call_later(self._statement_timeout, self._no_answer, conn)
        try:
            self._advance(conn)  # sends what is left of the query, or reads an early answer
            await waiter
        finally:
            timer.cancel()
            conn.waiter = None

    def _watch(self, conn: _Connection) -> None:
        assert self._loop is not None
        self._loop.add_reader(conn.fd, self._advance, conn)
        conn.watched = True

    def _unwatch(self, conn: _Connection) -> None:
        """Stops watching the socket. Done at once, in the callback that saw the
        failure: the driver may close the socket, and its number may be reused."""
        if self._loop is None:
            return
        if conn.watched:
            self._loop.remove_reader(conn.fd)
            conn.watched = False
        if conn.writing:
            self._loop.remove_writer(conn.fd)
            conn.writing = False

    def _advance(self, conn: _Connection) -> None:
        """The socket is ready (or a statement was just sent): let the driver go on."""
        try:
            state = conn.raw.poll()
        except Exception as e:  # the driver's error: a failed statement or a lost connection
            self._broken(conn, e)
            return
        if state == _POLL_OK:
            if conn.writing:
                assert self._loop is not None
                self._loop.remove_writer(conn.fd)
                conn.writing = False
            waiter = conn.waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif state == _POLL_WRITE:
            if not conn.writing:
                assert self._loop is not None
                self._loop.add_writer(conn.fd, self._advance, conn)
                conn.writing = True
        elif conn.writing:  # _POLL_READ: sent whole, the answer is to come
            assert self._loop is not None
            self._loop.remove_writer(conn.fd)
            conn.writing = False

    def _broken(self, conn: _Connection, error: Exception) -> None:
        """The driver failed on this connection. It will be closed either way: stop
        watching its socket now, in this callback, since the driver may have closed
        it already and the number may be reused."""
        self._unwatch(conn)
        waiter = conn.waiter
        if waiter is not None:
            # A statement was running: its caller closes the connection, and decides
            # whether the failure was the statement's or the connection's.
            if not waiter.done():
                waiter.set_exception(error)
            return
        # Idle (or handed to a caller who has not used it yet): the server went away.
        conn.dead = True
        if not conn.in_use:
            with contextlib.suppress(ValueError):
                self._idle.remove(conn)
            self._close(conn)
        self._mark_lost()

    def _no_answer(self, conn: _Connection) -> None:
        """No answer in the client-side time: the caller gives the connection up as lost."""
        self._unwatch(conn)
        conn.dead = True
        waiter = conn.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(_NoAnswer("no answer from the database in time"))


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(_NoAnswer("no connection came free in time"))


def _numbered(sql: str) -> str:
    """psycopg2's %s placeholders as PostgreSQL's $1, $2, ... (for PREPARE)."""
    if "%%" in sql or "%(" in sql:
        raise ValueError("only plain %s placeholders can be prepared")
    parts = sql.split("%s")
    return "".join(
        part + (f"${i + 1}" if i < len(parts) - 1 else "") for i, part in enumerate(parts)
    )


async def _resolved(loop: asyncio.AbstractEventLoop, params: dict[str, Any]) -> dict[str, Any]:
    """`params` with each host name looked up off the loop, as `hostaddr`: libpq
    would otherwise look it up itself, blocking, inside the first poll."""
    host = params.get("host")
    if not host or params.get("hostaddr"):
        return params
    addresses = []
    for name in str(host).split(","):
        if not name or name.startswith("/") or _is_address(name):
            return params  # a socket directory or an address: nothing to look up
        infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        addresses.append(str(infos[0][4][0]))
    return {**params, "hostaddr": ",".join(addresses)}


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


async def _connected(loop: asyncio.AbstractEventLoop, raw: Any) -> None:
    """Drives an asynchronous connection until it is ready. The socket may change
    on the way (libpq retries without TLS, or the next address), so each step
    asks for it again."""
    while True:
        state = raw.poll()
        if state == _POLL_OK:
            return
        fd = raw.fileno()
        ready: asyncio.Future[None] = loop.create_future()
        if state == _POLL_READ:
            loop.add_reader(fd, _set_done, ready)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
        else:
            loop.add_writer(fd, _set_done, ready)
            try:
                await ready
            finally:
                loop.remove_writer(fd)


def _set_done(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)
