"""Opening the database from a URL, with the settings each backend needs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from urllib.parse import urlparse

import peewee
from playhouse.db_url import connect

from .errors import Unavailable
from .models import database

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


class DatabaseURLError(ValueError):
    pass


def open_database(url: str, max_connections: int = 20) -> peewee.Database:
    """Builds a peewee Database for `url` and binds the models to it."""
    scheme = urlparse(url).scheme
    if scheme == "sqlite":
        if url in ("sqlite://", "sqlite:///"):
            raise DatabaseURLError(f"database URL {url!r} names no file")
        db = connect(url, pragmas=SQLITE_PRAGMAS, timeout=10)
    elif scheme in ("postgres", "postgresql"):
        # Pooled: one connection per worker at most, stale ones recycled, and
        # a statement timeout so a stuck query cannot hold a worker forever.
        pooled = "postgresql+pool" + url[len(scheme) :]
        db = connect(
            pooled,
            max_connections=max_connections,
            stale_timeout=300,
            timeout=10,
            options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
            connect_timeout=5,
        )
    else:
        raise DatabaseURLError(
            f"unsupported database URL {url!r}: use sqlite:///path.db or postgresql://..."
        )
    database.initialize(db)
    return db


def is_sqlite(db: peewee.Database) -> bool:
    return isinstance(db, peewee.SqliteDatabase)


DB_ERRORS = (peewee.OperationalError, peewee.InterfaceError, peewee.InternalError)


@contextlib.contextmanager
def connection(db: peewee.Database) -> Iterator[None]:
    """Holds a connection for one request and turns driver failures into Unavailable.

    SQLite keeps one connection per worker thread open (opening one costs more
    than a query); a pooled PostgreSQL connection goes back to the pool after
    every request, and a broken one is dropped so the next request reconnects.
    """
    sqlite = is_sqlite(db)
    try:
        db.connect(reuse_if_open=True)
        yield
    except DB_ERRORS as e:
        _discard(db)
        raise Unavailable("the token store is unavailable, try again") from e
    except peewee.DatabaseError as e:
        _discard(db)
        raise Unavailable("the token store is unavailable, try again") from e
    finally:
        if not sqlite and not db.is_closed():
            with contextlib.suppress(peewee.DatabaseError):
                db.close()


def _discard(db: peewee.Database) -> None:
    with contextlib.suppress(Exception):
        if hasattr(db, "manual_close"):
            db.manual_close()  # pooled: close for real, not back into the pool
        else:
            db.close()
