"""Numbered schema migrations; the applied version lives in the schema_version table.

Each migration is a small function of the database; it builds its own queries
(never the store's), so it keeps doing what it did when written. Migration 1
creates the first schema from a frozen copy of the models for the same reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import peewee

from . import models
from .db import is_sqlite, open_database

Migration = Callable[[peewee.Database], None]


def _m0001_initial(db: peewee.Database) -> None:
    class Base(peewee.Model):
        class Meta:
            database = db
            legacy_table_names = False

    class User(Base):
        id = peewee.UUIDField(primary_key=True)
        email = peewee.CharField(max_length=320, unique=True)
        org_id = peewee.CharField(max_length=200, index=True)
        permissions = peewee.TextField()
        disabled = peewee.BooleanField(default=False)
        created_at = peewee.BigIntegerField()

        class Meta:
            table_name = "users"

    class ApiToken(Base):
        id = peewee.UUIDField(primary_key=True)
        lookup_id = peewee.CharField(max_length=32, unique=True)
        token_prefix = peewee.CharField(max_length=16)
        secret_hash = peewee.CharField(max_length=100)
        name = peewee.CharField(max_length=200)
        scopes = peewee.TextField()
        expires_at = peewee.BigIntegerField(null=True)
        last_used_at = peewee.BigIntegerField(null=True)
        revoked_at = peewee.BigIntegerField(null=True)
        created_at = peewee.BigIntegerField()
        user = peewee.ForeignKeyField(User, on_delete="CASCADE", index=False)
        org_id = peewee.CharField(max_length=200)

        class Meta:
            table_name = "api_tokens"
            indexes = (
                (("user", "created_at", "id"), False),
                (("org_id", "created_at", "id"), False),
            )

    db.create_tables([User, ApiToken])


def _m0002_hot_last_used(db: peewee.Database) -> None:
    """Leave room in each api_tokens page so last_used_at updates stay in place.

    The usage recorder rewrites last_used_at for every token in use, every
    flush. last_used_at is in no index, so with free space on the page
    PostgreSQL makes these heap-only (HOT) updates: no new index entries, far
    less bloat and vacuum work. Applies to pages written from now on. SQLite
    updates rows in place anyway: nothing to do there.
    """
    if not is_sqlite(db):
        db.execute_sql("ALTER TABLE api_tokens SET (fillfactor = 85)")


MIGRATIONS: tuple[tuple[int, Migration], ...] = (
    (1, _m0001_initial),
    (2, _m0002_hot_last_used),
)
LATEST = MIGRATIONS[-1][0]


def current_version(db: peewee.Database) -> int:
    if not db.table_exists(models.SchemaVersion._meta.table_name):
        return 0
    top = models.SchemaVersion.select(peewee.fn.MAX(models.SchemaVersion.version)).scalar()
    return int(top or 0)


def migrate(db: peewee.Database, target: int = LATEST) -> list[int]:
    """Applies every pending migration up to `target`; returns the versions applied.

    Safe to run from several replicas at once: PostgreSQL serialises them on an
    advisory lock, SQLite on its write lock (BEGIN IMMEDIATE).
    """
    applied: list[int] = []
    with db.connection_context():
        with db.atomic("IMMEDIATE") if is_sqlite(db) else db.atomic():
            if not is_sqlite(db):
                db.execute_sql("SELECT pg_advisory_xact_lock(7401283)")
            db.create_tables([models.SchemaVersion], safe=True)
            version = current_version(db)
            for number, step in MIGRATIONS:
                if version < number <= target:
                    step(db)
                    models.SchemaVersion.create(
                        version=number, applied_at=time.time_ns() // 1000
                    )
                    applied.append(number)
    return applied


def open_migrated(url: str, max_connections: int = 20) -> peewee.Database:
    """open_database(), then create or upgrade the schema: what every entry point needs."""
    db = open_database(url, max_connections)
    migrate(db)
    return db
