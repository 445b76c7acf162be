"""Reads and writes of users and tokens: the only module of the rules' side that knows peewee.

It owns transactions, turns driver integrity errors into `Conflict`, and
returns plain values (values.py), never model objects. Migrations build their
own queries on purpose: they must keep doing what they did when written,
whatever this module and the models become.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager

import peewee
from peewee import Tuple

from . import db as dbmod
from .errors import Conflict
from .models import ApiToken, User
from .values import AuthRow, Cursor, NewToken, TokenInfo, UserInfo


class Store:
    def __init__(self, db: peewee.Database) -> None:
        self.db = db
        # SQLite answers the hot path's read from the page cache in microseconds,
        # so the rules may run it on an event loop; a PostgreSQL round trip may
        # not (it can stall until the statement timeout).
        self.inline_reads = dbmod.is_sqlite(db)
        # The hot path's query text, built by the ORM once here and reused as is
        # (the drivers still parse it per call; it saves peewee's query building).
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
                ApiToken.rate_limit_requests,
                ApiToken.rate_limit_period_us,
            )
            .join(User)
            .where(ApiToken.lookup_id == "?")
        )
        self._auth_sql, _ = query.sql()

    # Connections.

    def connection(self) -> AbstractContextManager[None]:
        """One connection for the caller's unit of work; driver failures become Unavailable."""
        return dbmod.connection(self.db)

    def close(self) -> None:
        """Closes the calling thread's connection, or the whole pool."""
        dbmod.close_all(self.db)

    def ping(self) -> None:
        self.db.execute_sql("SELECT 1").fetchone()

    # Authenticate.

    def find_for_auth(self, lookup_id: str) -> AuthRow | None:
        row = self.db.execute_sql(self._auth_sql, (lookup_id,)).fetchone()
        if row is None:
            return None
        tid, secret_hash, scopes, expires, revoked, uid, email, org, perms, disabled, \
            limit_requests, limit_period_us = row
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
            rate_limit_requests=limit_requests,
            rate_limit_period_us=limit_period_us,
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

    def insert_token(self, new: NewToken) -> TokenInfo:
        """Stores a token; `Conflict` if its lookup id is taken."""
        token_id = uuid.uuid4()
        try:
            with self.db.atomic():
                ApiToken.insert(
                    id=token_id,
                    lookup_id=new.lookup_id,
                    token_prefix=new.token_prefix,
                    secret_hash=new.secret_hash,
                    name=new.name,
                    scopes=list(new.scopes),
                    expires_at=new.expires_at,
                    created_at=new.created_at,
                    user=uuid.UUID(new.user_id),
                    org_id=new.org_id,
                ).execute()
        except peewee.IntegrityError:
            raise Conflict("lookup id taken") from None
        info = self.get_token(str(token_id))
        assert info is not None
        return info

    def get_token(self, token_id: str) -> TokenInfo | None:
        try:
            key = uuid.UUID(token_id)
        except ValueError:
            return None
        token = ApiToken.select(ApiToken, User).join(User).where(ApiToken.id == key).first()
        return None if token is None else _token_info(token)

    def revoke(self, token_id: str, now: int) -> TokenInfo | None:
        """Sets revoked_at unless already set; returns the token as it now stands."""
        with self.db.atomic():
            ApiToken.update(revoked_at=now).where(
                (ApiToken.id == uuid.UUID(token_id)) & ApiToken.revoked_at.is_null()
            ).execute()
        return self.get_token(token_id)

    def list_tokens(
        self, *, org_id: str, user_id: str | None, after: Cursor | None, limit: int
    ) -> list[TokenInfo]:
        """Newest first, keyset-paginated on (created_at, id): no OFFSET, no COUNT."""
        query = ApiToken.select(ApiToken, User).join(User).where(ApiToken.org_id == org_id)
        if user_id is not None:
            query = query.where(ApiToken.user == uuid.UUID(user_id))
        if after is not None:
            # A row-value comparison, which both backends answer from the index;
            # values in a Tuple skip field conversion, so convert the id here.
            last_key = ApiToken.id.db_value(uuid.UUID(after.id))
            query = query.where(
                Tuple(ApiToken.created_at, ApiToken.id) < Tuple(after.created_at, last_key)
            )
        query = query.order_by(ApiToken.created_at.desc(), ApiToken.id.desc()).limit(limit)
        return [_token_info(t) for t in query]

    # Users.

    def add_user(self, email: str, org_id: str, permissions: Iterable[str], now: int) -> UserInfo:
        """Stores a user; `Conflict` if the email is taken."""
        try:
            with self.db.atomic():
                user = User.create(
                    id=uuid.uuid4(), email=email, org_id=org_id,
                    permissions=list(permissions), created_at=now,
                )
        except peewee.IntegrityError:
            raise Conflict("email taken") from None
        return _user_info(user)

    def find_user(self, email: str) -> UserInfo | None:
        user = User.get_or_none(User.email == email)
        return None if user is None else _user_info(user)

    def set_user_disabled(self, email: str, disabled: bool) -> bool:
        """Whether a user with that email exists (and now has that state)."""
        with self.db.atomic():
            return User.update(disabled=disabled).where(User.email == email).execute() > 0


def _token_info(token: ApiToken) -> TokenInfo:
    return TokenInfo(
        id=str(token.id),
        name=token.name,
        token_prefix=token.token_prefix,
        scopes=tuple(token.scopes),
        expires_at=token.expires_at,
        last_used_at=token.last_used_at,
        revoked_at=token.revoked_at,
        created_at=token.created_at,
        created_by_email=token.user.email,
        org_id=token.org_id,
        user_id=str(token.user_id),
    )


def _user_info(user: User) -> UserInfo:
    return UserInfo(
        id=str(user.id),
        email=user.email,
        org_id=user.org_id,
        permissions=tuple(user.permissions),
        disabled=bool(user.disabled),
        created_at=user.created_at,
    )


def _uuid_str(value: object) -> str:
    """SQLite hands back the UUID as 32 hex digits, PostgreSQL as a uuid or str."""
    if type(value) is str and len(value) == 32:  # SQLite: format without parsing twice
        h = value.lower()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    return str(value if isinstance(value, uuid.UUID) else uuid.UUID(str(value)))


__all__ = ["Store"]
