"""Peewee models. Timestamps are integer microseconds since the epoch, UTC.

Integers compare the same way on SQLite and PostgreSQL, which keyset
pagination relies on, and carry no time-zone ambiguity.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime

from peewee import (
    BigIntegerField,
    BooleanField,
    CharField,
    DatabaseProxy,
    ForeignKeyField,
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

    class Meta:
        table_name = "api_tokens"
        # Keyset pagination, newest first, for one user and for a whole org.
        indexes = (
            (("user", "created_at", "id"), False),
            (("org_id", "created_at", "id"), False),
        )


class SchemaVersion(BaseModel):
    version = BigIntegerField(primary_key=True)
    applied_at = UtcDateTimeField()

    class Meta:
        table_name = "schema_version"
