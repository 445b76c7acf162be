"""Peewee models. Timestamps are integer microseconds since the epoch, UTC.

Integers compare the same way on SQLite and PostgreSQL, which keyset
pagination relies on, and carry no time-zone ambiguity.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime

from peewee import (
    SQL,
    BigIntegerField,
    BooleanField,
    CharField,
    CompositeKey,
    DatabaseProxy,
    ForeignKeyField,
    IntegerField,
    Model,
    TextField,
    UUIDField,
)

from .values import from_micros, to_micros

database = DatabaseProxy()


class UtcDateTimeField(BigIntegerField):
    """An aware UTC datetime stored as integer microseconds."""

    def db_value(self, value: datetime | int | None) -> int | None:
        if value is None or isinstance(value, int):
            return value
        return to_micros(value)

    def python_value(self, value: int | None) -> datetime | None:
        return None if value is None else from_micros(int(value))


class StringListField(TextField):
    """A list of strings stored as a JSON array."""

    def db_value(self, value: list[str] | tuple[str, ...] | None) -> str | None:
        return None if value is None else json.dumps(list(value))

    def python_value(self, value: str | None) -> list[str] | None:
        return None if value is None else json.loads(value)


class BaseModel(Model):
    class Meta:
        database = database
        legacy_table_names = False


class User(BaseModel):
    id = UUIDField(primary_key=True, default=uuid.uuid4)
    email = CharField(max_length=320, unique=True)
    org_id = CharField(max_length=200, index=True)
    permissions = StringListField(default=list)
    disabled = BooleanField(default=False)
    created_at = UtcDateTimeField()

    class Meta:
        table_name = "users"


class ApiToken(BaseModel):
    id = UUIDField(primary_key=True, default=uuid.uuid4)
    # The random, non-secret part of the raw token: the one key lookups use.
    lookup_id = CharField(max_length=32, unique=True)
    token_prefix = CharField(max_length=16)
    # bcrypt hash of the secret part; the raw token is stored nowhere.
    secret_hash = CharField(max_length=100)
    name = CharField(max_length=200)
    scopes = StringListField()
    expires_at = UtcDateTimeField(null=True)
    last_used_at = UtcDateTimeField(null=True)
    revoked_at = UtcDateTimeField(null=True)
    created_at = UtcDateTimeField()
    user = ForeignKeyField(User, backref="tokens", on_delete="CASCADE", index=False)
    org_id = CharField(max_length=200)
    # The token whose caller minted this one (the token tree); None for the CLI.
    parent_id = UUIDField(null=True)
    rotated_from_id = UUIDField(null=True)
    replaced_by_id = UUIDField(null=True)
    # The token's own rate limit; both None for the service default.
    rate_limit_requests = IntegerField(null=True)
    rate_limit_period_us = BigIntegerField(null=True)
    # When token.reuse_after_rotation was last recorded (micros).
    reuse_reported_at = BigIntegerField(null=True)
    # last_used_at in whole days since the epoch, 0 if never used: the indexed
    # stand-in for last_used_at (see migration 3). The schema's DEFAULT 0 fills
    # it on insert, so inserts need not name it.
    last_used_day = IntegerField(constraints=[SQL("DEFAULT 0")])

    class Meta:
        table_name = "api_tokens"
        # Keyset pagination, newest first, for one user and for a whole org.
        indexes = (
            (("user", "created_at", "id"), False),
            (("org_id", "created_at", "id"), False),
        )


class AuditEvent(BaseModel):
    """One append-only audit log entry; never updated, deleted only by retention."""

    id = UUIDField(primary_key=True, default=uuid.uuid4)
    time = BigIntegerField()  # micros, like every other time here
    action = CharField(max_length=64)
    org_id = CharField(max_length=200)
    actor_user_id = CharField(max_length=36)
    actor_email = CharField(max_length=320)
    actor_token_id = CharField(max_length=36)
    token_id = CharField(max_length=36)
    client_address = CharField(max_length=200)
    details = TextField()  # a JSON object

    class Meta:
        table_name = "audit_events"


class TokenEvent(BaseModel):
    """A committed change that narrowed tokens, for the processes whose consumers cache."""

    id = BigIntegerField(primary_key=True)  # AUTOINCREMENT / BIGSERIAL (migration 4)
    created_at = BigIntegerField()  # micros, the store's clock
    token_ids = StringListField()
    user_ids = StringListField()

    class Meta:
        table_name = "token_events"


class LeaseReplica(BaseModel):
    """A server process with watching consumers: until when their leases may hold."""

    replica_id = CharField(max_length=36, primary_key=True)
    # Events with a greater id are this process's to deliver; earlier ones predate it.
    watch_from = BigIntegerField()
    heartbeat_at = BigIntegerField()
    lease_until = BigIntegerField()

    class Meta:
        table_name = "lease_replicas"


class TokenEventAck(BaseModel):
    """A process has delivered an event to each of its consumers (or their leases ran out)."""

    event_id = BigIntegerField()
    replica_id = CharField(max_length=36)

    class Meta:
        table_name = "token_event_acks"
        primary_key = CompositeKey("event_id", "replica_id")


class SchemaVersion(BaseModel):
    version = BigIntegerField(primary_key=True)
    applied_at = UtcDateTimeField()

    class Meta:
        table_name = "schema_version"
