"""Numbered schema migrations; the applied version lives in the schema_version table.

Each migration is a small function of the database; it builds its own queries
(never the store's), so it keeps doing what it did when written. Migration 1
creates the first schema from a frozen copy of the models for the same reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import peewee
from playhouse.migrate import PostgresqlMigrator, SqliteMigrator

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


def _m0003_lifecycle(db: peewee.Database) -> None:
    """The token tree, rotation links, per-token rate limits and the audit log.

    Indexes for the filters of ListTokens at a million tokens in one org. A
    filter matching many tokens is best read in the list's own order, newest
    first, stopping after a page; one matching few is best read from an index
    on the filtered column, then sorted:

    - live tokens (revoked_at IS NULL: ACTIVE and EXPIRED) in list order,
      carrying expires_at and last_used_day so those conditions are checked
      in the index and only matching rows are read;
    - revoked tokens (REVOKED) in list order;
    - children by parent, for revoking a subtree;
    - PostgreSQL only: live tokens by expiry (few EXPIRED) and tokens by
      last_used_day (few unused since a date). PostgreSQL keeps statistics
      (autovacuum analyzes) and picks these only when few rows match. SQLite
      has none unless ANALYZE is run, and without them it took these range
      indexes even when most rows matched: sorting 300,000 rows for a page,
      seconds instead of milliseconds at a million tokens. On SQLite a filter
      matching few tokens reads the list-order index to its end instead.

    last_used_day is last_used_at in whole days, never null (0: never used).
    last_used_at itself stays out of every index, so the usage flush, which
    rewrites it every few seconds for every token in use, stays a heap-only
    update on PostgreSQL (migration 2); last_used_day changes at most once a
    day per token.
    """
    migrator = SqliteMigrator(db) if is_sqlite(db) else PostgresqlMigrator(db)
    day = 86_400_000_000
    columns = [
        ("parent_id", peewee.UUIDField(null=True)),
        ("rotated_from_id", peewee.UUIDField(null=True)),
        ("replaced_by_id", peewee.UUIDField(null=True)),
        ("rate_limit_requests", peewee.IntegerField(null=True)),
        ("rate_limit_period_us", peewee.BigIntegerField(null=True)),
        # When token.reuse_after_rotation was last recorded for this token.
        ("reuse_reported_at", peewee.BigIntegerField(null=True)),
    ]
    for name, field in columns:
        migrator.add_column("api_tokens", name, field).run()
    # A default in the schema, not only in the model: rows inserted by code that
    # does not name the column (a bulk loader) still satisfy NOT NULL.
    db.execute_sql(
        "ALTER TABLE api_tokens ADD COLUMN last_used_day INTEGER NOT NULL DEFAULT 0"
    )
    db.execute_sql(
        f"UPDATE api_tokens SET last_used_day = last_used_at / {day}"
        " WHERE last_used_at IS NOT NULL"
    )
    for sql in (
        "CREATE INDEX api_tokens_org_live ON api_tokens"
        " (org_id, created_at, id, expires_at, last_used_day) WHERE revoked_at IS NULL",
        "CREATE INDEX api_tokens_org_revoked ON api_tokens"
        " (org_id, created_at, id) WHERE revoked_at IS NOT NULL",
        "CREATE INDEX api_tokens_parent ON api_tokens (parent_id)"
        " WHERE parent_id IS NOT NULL",
    ):
        db.execute_sql(sql)
    if not is_sqlite(db):
        db.execute_sql(
            "CREATE INDEX api_tokens_org_expiry ON api_tokens (org_id, expires_at)"
            " WHERE revoked_at IS NULL AND expires_at IS NOT NULL"
        )
        db.execute_sql(
            "CREATE INDEX api_tokens_org_last_used ON api_tokens (org_id, last_used_day)"
        )

    class AuditEvent(peewee.Model):
        id = peewee.UUIDField(primary_key=True)
        time = peewee.BigIntegerField()
        action = peewee.CharField(max_length=64)
        org_id = peewee.CharField(max_length=200)
        actor_user_id = peewee.CharField(max_length=36)
        actor_email = peewee.CharField(max_length=320)
        actor_token_id = peewee.CharField(max_length=36)
        token_id = peewee.CharField(max_length=36)
        client_address = peewee.CharField(max_length=200)
        details = peewee.TextField()

        class Meta:
            database = db
            table_name = "audit_events"
            # Newest first per org, per token, per action; and by age for pruning.
            indexes = (
                (("org_id", "time", "id"), False),
                (("token_id", "time", "id"), False),
                (("org_id", "action", "time", "id"), False),
                (("time",), False),
            )

    db.create_tables([AuditEvent])


def _m0004_token_events(db: peewee.Database) -> None:
    """What consumers caching Authenticate's answers need across processes and replicas.

    - token_events: one row per committed change that narrows tokens (written
      in that change's transaction), numbered in commit order; every server
      process reads the new ones and tells its watching consumers;
    - lease_replicas: per server process with watching consumers, until when a
      lease it granted may still hold (the store's clock), and the first event
      it is answerable for;
    - token_event_acks: which process has told all its consumers of which event.

    The id of token_events never goes back (AUTOINCREMENT on SQLite, a
    sequence on PostgreSQL), so "the events after the last one read" is exact.
    """
    if is_sqlite(db):
        db.execute_sql(
            "CREATE TABLE token_events (id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " created_at BIGINT NOT NULL, token_ids TEXT NOT NULL, user_ids TEXT NOT NULL)"
        )
    else:
        db.execute_sql(
            "CREATE TABLE token_events (id BIGSERIAL PRIMARY KEY,"
            " created_at BIGINT NOT NULL, token_ids TEXT NOT NULL, user_ids TEXT NOT NULL)"
        )
    db.execute_sql("CREATE INDEX token_events_created_at ON token_events (created_at)")
    db.execute_sql(
        "CREATE TABLE lease_replicas (replica_id VARCHAR(36) PRIMARY KEY,"
        " watch_from BIGINT NOT NULL, heartbeat_at BIGINT NOT NULL, lease_until BIGINT NOT NULL)"
    )
    db.execute_sql(
        "CREATE TABLE token_event_acks (event_id BIGINT NOT NULL,"
        " replica_id VARCHAR(36) NOT NULL, PRIMARY KEY (event_id, replica_id))"
    )


MIGRATIONS: tuple[tuple[int, Migration], ...] = (
    (1, _m0001_initial),
    (2, _m0002_hot_last_used),
    (3, _m0003_lifecycle),
    (4, _m0004_token_events),
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
