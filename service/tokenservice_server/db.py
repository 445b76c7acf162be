"""Opening the database from a URL, with the settings each backend needs.

PostgreSQL is how several replicas share one store, so its connections must
survive what a shared database does: restarts, failovers, a DBA killing
backends, a stuck query. The rules here:

- connections are pooled; a connection that failed is closed for real, never
  handed back to the pool, and every connection opened before it goes with it
  (a restart killed them all): idle ones at once, those other threads hold when
  they come back, so the next request opens a fresh one;
- a connection idle for more than a second is pinged when checked out, so a
  quiet service notices a restart before a caller does;
- every statement has a timeout, and a transaction left idle is ended by the
  server, so one stuck worker cannot hold locks or a pool slot forever;
- any driver error becomes `Unavailable` with one fixed message: callers see
  UNAVAILABLE and retry, and no driver text reaches them.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import peewee
from playhouse.db_url import connect, parse
from playhouse.pool import MaxConnectionsExceeded, PooledPostgresqlDatabase

try:
    import psycopg2
    import psycopg2.extensions
except ImportError:  # pragma: no cover - SQLite-only installs
    psycopg2 = None

from .errors import Unavailable
from .models import database

log = logging.getLogger("tokenservice.db")

# SQLite: WAL lets readers run beside the writer; FULL sync makes every
# acknowledged write survive a crash or power loss; the busy timeout queues
# writers instead of failing with "database is locked".
SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "full",
    "foreign_keys": 1,
    "busy_timeout": 10_000,
    "cache_size": -16_000,
}
STATEMENT_TIMEOUT_MS = 5_000
# A transaction nobody is using any more (a worker died mid-request) is ended
# by the server after this long, releasing its locks.
IDLE_IN_TRANSACTION_TIMEOUT_MS = 30_000
# Pooled connections unused for longer than this are pinged on check-out.
PING_AFTER_IDLE_SECONDS = 1.0
# Connections older than this are replaced, so the pool follows DNS and failovers.
STALE_SECONDS = 300
UNAVAILABLE_MESSAGE = "the token store is unavailable, try again"


class DatabaseURLError(ValueError):
    pass


class PostgresPool(PooledPostgresqlDatabase):
    """peewee's PostgreSQL pool, with a cheap liveness check on check-out.

    peewee pings every connection on check-out (one more round trip per
    request). We ping only connections that sat idle for a while; one that
    dies under load fails its request, and connection() then discards it and
    every idle sibling.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._idle_since: dict[int, float] = {}
        self._idle_lock = threading.Lock()
        self._lost_at = 0.0
        super().__init__(*args, **kwargs)

    def mark_lost(self) -> None:
        """Every connection opened before now is presumed dead: those checked out
        by other threads at this moment are closed when they come back, not
        handed to the next request."""
        self._lost_at = time.time()

    def _is_stale(self, timestamp: float) -> bool:
        # peewee calls this with the connection's creation time on check-in and check-out.
        return timestamp <= self._lost_at or bool(super()._is_stale(timestamp))

    def _can_reuse(self, conn: Any) -> bool:
        reusable = bool(super()._can_reuse(conn)) and not conn.closed
        if reusable:
            with self._idle_lock:
                self._idle_since[self.conn_key(conn)] = time.monotonic()
        return reusable

    def _is_closed(self, conn: Any) -> bool:
        with self._idle_lock:
            idle_since = self._idle_since.pop(self.conn_key(conn), None)
        if conn.closed:
            return True
        if idle_since is None or time.monotonic() - idle_since > PING_AFTER_IDLE_SECONDS:
            return bool(super()._is_closed(conn))  # a round trip: SELECT 1
        status = self._adapter.txn_status(conn)
        return status != self._adapter.txn_idle

    def _close_raw(self, conn: Any) -> None:
        with self._idle_lock:
            self._idle_since.pop(self.conn_key(conn), None)
        super()._close_raw(conn)


def open_database(url: str, max_connections: int = 20, bind: bool = True) -> peewee.Database:
    """Builds a peewee Database for `url` and, unless `bind` is False (a second pool
    for raw queries), binds the models to it."""
    scheme = urlparse(url).scheme
    if scheme == "sqlite":
        if url in ("sqlite://", "sqlite:///"):
            raise DatabaseURLError(f"database URL {url!r} names no file")
        db = connect(url, pragmas=SQLITE_PRAGMAS, timeout=10)
    elif scheme in ("postgres", "postgresql"):
        db = PostgresPool(
            max_connections=max_connections,
            stale_timeout=STALE_SECONDS,
            timeout=10,  # seconds to wait for a free pooled connection
            **postgres_params(url),
        )
    else:
        raise DatabaseURLError(
            f"unsupported database URL {url!r}: use sqlite:///path.db or postgresql://..."
        )
    if bind:
        database.initialize(db)
    return db


def postgres_params(url: str) -> dict[str, Any]:
    """psycopg2.connect's arguments for a PostgreSQL URL, with the timeouts and
    keepalives every connection of the service gets (pgasync.py's too)."""
    params: dict[str, Any] = parse(url)
    if not params.get("database"):
        raise DatabaseURLError(f"database URL {url!r} names no database")
    server_options = (
        f"-c statement_timeout={STATEMENT_TIMEOUT_MS} "
        f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT_MS}"
    )
    params.setdefault("options", server_options)
    params.setdefault("connect_timeout", 5)
    params.setdefault("application_name", "tokenservice")
    # TCP keepalives: a server that vanished from the network (no RST) is
    # noticed in about a minute instead of the kernel's two hours.
    params.setdefault("keepalives", 1)
    params.setdefault("keepalives_idle", 30)
    params.setdefault("keepalives_interval", 10)
    params.setdefault("keepalives_count", 3)
    return params


def is_sqlite(db: peewee.Database) -> bool:
    return isinstance(db, peewee.SqliteDatabase)


# peewee wraps driver errors raised while executing, but not those raised while
# fetching rows from a cursor (psycopg2.InterfaceError when the server went away
# mid-fetch): catch the drivers' own base classes too.
DB_ERRORS: tuple[type[BaseException], ...] = (
    peewee.DatabaseError,
    peewee.InterfaceError,  # not a DatabaseError in peewee: "connection already closed"
    MaxConnectionsExceeded,
    sqlite3.Error,
    *((psycopg2.Error,) if psycopg2 is not None else ()),
)


@contextlib.contextmanager
def connection(db: peewee.Database) -> Iterator[None]:
    """Holds a connection for one request and turns driver failures into Unavailable.

    SQLite keeps one connection per worker thread open (opening one costs more
    than a query); a pooled PostgreSQL connection goes back to the pool after
    every request. After a database error the connection is closed for real,
    so the next request reconnects.
    """
    sqlite = is_sqlite(db)
    try:
        db.connect(reuse_if_open=True)
        yield
    except DB_ERRORS as e:
        broken = _discard(db)
        if broken:
            _discard_idle(db)
        raise Unavailable(UNAVAILABLE_MESSAGE) from e
    finally:
        if not sqlite and not db.is_closed():
            try:
                db.close()
            except Exception:
                _discard(db)


def _discard(db: peewee.Database) -> bool:
    """Closes this thread's connection without returning it to a pool.

    Returns True when the connection was already broken (lost by the server),
    as opposed to merely having run a failing statement. peewee pops its
    transaction stack before rolling back, so no transaction is left open here
    and the public close calls apply.
    """
    if db.is_closed():
        return True
    conn = db.connection()
    broken = bool(getattr(conn, "closed", False))
    if isinstance(db, PostgresPool):
        with contextlib.suppress(Exception):
            broken = broken or (
                conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_UNKNOWN
            )
        with contextlib.suppress(Exception):
            db.manual_close()  # closes it for real; the pool forgets it
    else:
        with contextlib.suppress(Exception):
            db.close()
    return broken


def _discard_idle(db: peewee.Database) -> None:
    """A lost connection usually means the server restarted: its idle siblings are dead too."""
    if isinstance(db, PostgresPool):
        db.mark_lost()
        with contextlib.suppress(Exception):
            db.close_idle()
        log.warning("lost the database connection; reconnecting on the next request")


def mark_lost(db: peewee.Database) -> None:
    """Another pool found the server gone: this pool's connections opened until
    now are closed when next checked out or handed back (no I/O here)."""
    if isinstance(db, PostgresPool):
        db.mark_lost()


def close_all(db: peewee.Database) -> None:
    """Closes every connection (pooled or per-thread) on shutdown."""
    with contextlib.suppress(Exception):
        if isinstance(db, PostgresPool):
            db.close_all()
        else:
            db.close()
