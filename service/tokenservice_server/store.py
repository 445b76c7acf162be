"""Reads and writes of users and tokens. The only module that builds queries."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import peewee
from peewee import Tuple

from .models import ApiToken, User, from_micros


@dataclass(frozen=True, slots=True)
class AuthRow:
    """What Authenticate needs of a token and its user, read in one indexed query."""

    token_id: str
    secret_hash: str
    scopes: list[str]
    expires_at: int | None
    revoked_at: int | None
    user_id: str
    email: str
    org_id: str
    permissions: list[str]
    disabled: bool


class Store:
    def __init__(self, db: peewee.Database) -> None:
        self.db = db
        # The hot path runs one prepared statement; the ORM builds it once here.
        query = (
            ApiToken.select(
                ApiToken.id,
                ApiToken.secret_hash,
                ApiToken.scopes,
                ApiToken.expires_at,
                ApiToken.revoked_at,
                User.id,
                User.email,
                User.org_id,
                User.permissions,
                User.disabled,
            )
            .join(User)
            .where(ApiToken.lookup_id == "?")
        )
        self._auth_sql, _ = query.sql()

    # Authenticate.

    def find_for_auth(self, lookup_id: str) -> AuthRow | None:
        row = self.db.execute_sql(self._auth_sql, (lookup_id,)).fetchone()
        if row is None:
            return None
        tid, secret_hash, scopes, expires, revoked, uid, email, org, perms, disabled = row
        return AuthRow(
            token_id=_uuid_str(tid),
            secret_hash=secret_hash,
            scopes=json.loads(scopes),
            expires_at=expires,
            revoked_at=revoked,
            user_id=_uuid_str(uid),
            email=email,
            org_id=org,
            permissions=json.loads(perms),
            disabled=bool(disabled),
        )

    def write_last_used(self, last_used: Mapping[str, int]) -> None:
        """Writes a batch of last-use times (micros) in one transaction, never moving one back."""
        with self.db.atomic():
            for token_id, when in last_used.items():
                (
                    ApiToken.update(last_used_at=when)
                    .where(
                        (ApiToken.id == uuid.UUID(token_id))
                        & (ApiToken.last_used_at.is_null() | (ApiToken.last_used_at < when))
                    )
                    .execute()
                )

    # Tokens.

    def insert_token(
        self,
        *,
        lookup_id: str,
        token_prefix: str,
        secret_hash: str,
        name: str,
        scopes: list[str],
        expires_at: int | None,
        created_at: int,
        user_id: str,
        org_id: str,
    ) -> ApiToken:
        token = ApiToken.create(
            id=uuid.uuid4(),
            lookup_id=lookup_id,
            token_prefix=token_prefix,
            secret_hash=secret_hash,
            name=name,
            scopes=scopes,
            expires_at=expires_at,
            created_at=created_at,
            user=uuid.UUID(user_id),
            org_id=org_id,
        )
        return self.get_token(str(token.id))  # type: ignore[return-value]

    def get_token(self, token_id: str) -> ApiToken | None:
        try:
            key = uuid.UUID(token_id)
        except ValueError:
            return None
        return (
            ApiToken.select(ApiToken, User)
            .join(User)
            .where(ApiToken.id == key)
            .first()
        )

    def revoke(self, token_id: str, now: int) -> None:
        ApiToken.update(revoked_at=now).where(
            (ApiToken.id == uuid.UUID(token_id)) & ApiToken.revoked_at.is_null()
        ).execute()

    def list_tokens(
        self,
        *,
        org_id: str,
        user_id: str | None,
        after: tuple[int, str] | None,
        limit: int,
    ) -> list[ApiToken]:
        """Newest first, keyset-paginated on (created_at, id): no OFFSET, no COUNT."""
        query = ApiToken.select(ApiToken, User).join(User).where(ApiToken.org_id == org_id)
        if user_id is not None:
            query = query.where(ApiToken.user == uuid.UUID(user_id))
        if after is not None:
            created, last_id = after
            # A row-value comparison, which both backends answer from the index;
            # values in a Tuple skip field conversion, so convert the id here.
            last_key = ApiToken.id.db_value(uuid.UUID(last_id))
            query = query.where(
                Tuple(ApiToken.created_at, ApiToken.id) < Tuple(created, last_key)
            )
        query = query.order_by(ApiToken.created_at.desc(), ApiToken.id.desc()).limit(limit)
        return list(query)

    # Users.

    def add_user(self, email: str, org_id: str, permissions: Iterable[str], now: int) -> User:
        return User.create(
            id=uuid.uuid4(), email=email, org_id=org_id, permissions=list(permissions),
            created_at=now,
        )

    def find_user(self, email: str) -> User | None:
        return User.get_or_none(User.email == email)

    def set_user_disabled(self, email: str, disabled: bool) -> int:
        return User.update(disabled=disabled).where(User.email == email).execute()

    def ping(self) -> None:
        self.db.execute_sql("SELECT 1").fetchone()


def _uuid_str(value: object) -> str:
    """SQLite hands back the UUID as 32 hex digits, PostgreSQL as a uuid or str."""
    if type(value) is str and len(value) == 32:  # SQLite: format without parsing twice
        h = value.lower()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    return str(value if isinstance(value, uuid.UUID) else uuid.UUID(str(value)))


__all__ = ["AuthRow", "Store", "from_micros"]
