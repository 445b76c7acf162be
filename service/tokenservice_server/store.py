"""Reads and writes of users and tokens: the only module of the rules' side that knows peewee.

It owns transactions, turns driver integrity errors into `Conflict`, and
returns plain values (values.py), never model objects. Migrations build their
own queries on purpose: they must keep doing what they did when written,
whatever this module and the models become.
"""

from __future__ import annotations

import json
import logging
import select
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import peewee
from peewee import Tuple

from . import db as dbmod
from . import narrowing
from .errors import Conflict, Unavailable
from .models import ApiToken, AuditEvent, LeaseReplica, TokenEventAck, User
from .values import (
    DAY_MICROS,
    UPDATABLE,
    AuditEntry,
    AuthRow,
    Cursor,
    Narrowed,
    NewToken,
    RateLimit,
    TokenInfo,
    TokenState,
    UserInfo,
    from_micros,
    token_state,
)
from .values import AuditEvent as AuditEventValue

if TYPE_CHECKING:
    from .pgasync import ReadPool

# PostgreSQL: narrowing transactions take this advisory lock just before they
# write their event, so events commit in id order and "every event after the
# last one read" misses none (a sequence alone hands out ids in one order and
# transactions may commit in another).
EVENTS_LOCK = 7401284
EVENTS_CHANNEL = "tokenservice_token_events"
_PG_NOW = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::bigint"
ACKS_CHANNEL = "tokenservice_token_event_acks"
# The name Authenticate's read is prepared under on the event loop's connections.
AUTH_STATEMENT = "tokenservice_auth"

# Every audit event is also one JSON log line on this logger, written once its
# transaction has committed, for a log shipper to forward.
audit_log = logging.getLogger("tokenservice.audit")


class _Refused(Exception):
    """Rolls a transaction back when a conditional write found the row changed."""


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
                ApiToken.replaced_by_id,
                ApiToken.rate_limit_requests,
                ApiToken.rate_limit_period_us,
            )
            .join(User)
            .where(ApiToken.lookup_id == "?")
        )
        self._auth_sql, _ = query.sql()
        # PostgreSQL: where afind_for_auth reads, on the event loop (read_on_loop).
        self.loop_reads: ReadPool | None = None

    def read_on_loop(self, url: str, max_connections: int, others: Sequence[Store] = ()) -> None:
        """Lets afind_for_auth read on the event loop, through asynchronous
        connections of its own (PostgreSQL; SQLite reads inline already).

        When those find the server gone, the connections of this store and of
        `others` (the same server) are presumed lost too, so the next caller of
        any of them gets a fresh one rather than the loss.
        """
        from .pgasync import ReadPool  # psycopg2: PostgreSQL only

        databases = [self.db, *(other.db for other in others)]

        def lost() -> None:
            for db in databases:
                dbmod.mark_lost(db)

        self.loop_reads = ReadPool(
            dbmod.postgres_params(url), max_connections, {AUTH_STATEMENT: self._auth_sql}, lost
        )

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
        return None if row is None else _auth_row(row)

    async def afind_for_auth(self, lookup_id: str) -> AuthRow | None:
        """find_for_auth on the event loop, without a thread (after read_on_loop)."""
        assert self.loop_reads is not None
        row = await self.loop_reads.fetchone(AUTH_STATEMENT, (lookup_id,))
        return None if row is None else _auth_row(row)

    async def aclose_loop_reads(self) -> None:
        """Closes the event loop's connections (on that loop, at shutdown)."""
        if self.loop_reads is not None:
            await self.loop_reads.aclose()

    def rate_limits(
        self, token_ids: Sequence[str]
    ) -> dict[str, tuple[int | None, int | None]]:
        """Each existing token's own limit, (requests, period_us) or (None, None): one
        query per 500 ids (SQLite bounds a statement's parameters)."""
        keys = [uuid.UUID(t) for t in token_ids]
        found: dict[str, tuple[int | None, int | None]] = {}
        for at in range(0, len(keys), 500):
            rows = (
                ApiToken.select(ApiToken.id, ApiToken.rate_limit_requests,
                                ApiToken.rate_limit_period_us)
                .where(ApiToken.id.in_(keys[at:at + 500])).tuples()
            )
            found.update((_uuid_str(tid), (requests, period_us))
                         for tid, requests, period_us in rows)
        return found

    def write_last_used(self, last_used: Mapping[str, int]) -> None:
        """Writes a batch of last-use times (micros) in one transaction, never moving one back.

        last_used_day rides along; it changes at most once a day, so on
        PostgreSQL the update stays heap-only the rest of the time.
        """
        with self.db.atomic():
            for token_id, when in last_used.items():
                (
                    ApiToken.update(last_used_at=when, last_used_day=when // DAY_MICROS)
                    .where(
                        (ApiToken.id == uuid.UUID(token_id))
                        & (ApiToken.last_used_at.is_null() | (ApiToken.last_used_at < when))
                    )
                    .execute()
                )

    # Tokens.

    def insert_token(self, new: NewToken, audit: Sequence[AuditEntry], now: int) -> TokenInfo:
        """Stores a token and its audit events; `Conflict` if its lookup id is taken.

        Each event's token_id, when empty, becomes the new token's id.
        """
        token_id = uuid.uuid4()
        try:
            with self.db.atomic():
                ApiToken.insert(**_new_token_row(token_id, new)).execute()
                events = self._append(audit, now, token_id=str(token_id))
        except peewee.IntegrityError:
            raise Conflict("lookup id taken") from None
        _emit(events)
        info = self.get_token(str(token_id), now)
        assert info is not None
        return info

    def get_token(self, token_id: str, now: int) -> TokenInfo | None:
        try:
            key = uuid.UUID(token_id)
        except ValueError:
            return None
        token = ApiToken.select(ApiToken, User).join(User).where(ApiToken.id == key).first()
        return None if token is None else _token_info(token, now)

    def _subtree(self, root: uuid.UUID) -> list[uuid.UUID]:
        """Ids of every token below root in the token tree (root excluded)."""
        below = (
            ApiToken.select(ApiToken.id).where(ApiToken.parent_id == root)
            .cte("subtree", recursive=True, columns=("id",))
        )
        child = ApiToken.alias("child")
        below = below.union(
            child.select(child.id).join(below, on=(child.parent_id == below.c.id))
        )
        rows = below.select_from(below.c.id).tuples()
        return [v if isinstance(v, uuid.UUID) else uuid.UUID(str(v)) for (v,) in rows]

    def revoke(
        self,
        token_id: str,
        now: int,
        audit: AuditEntry,
        *,
        children: AuditEntry | None = None,
    ) -> TokenInfo | None:
        """Revokes a token unless it already is; with `children`, its whole subtree too.

        One transaction: the token's event is written only if this call revoked
        it, and `children` (its token_id filled in) once per descendant revoked
        here. Returns the token as it now stands.
        """
        root = uuid.UUID(token_id)
        with self.db.atomic():
            changed = ApiToken.update(revoked_at=now).where(
                (ApiToken.id == root) & ApiToken.revoked_at.is_null()
            ).execute()
            events = self._append([audit], now) if changed else []
            revoked = [token_id] if changed else []
            if children is not None:
                # Row by row, each conditional: an event is written exactly for
                # each token this call revoked, whatever ran beside it.
                for child in self._subtree(root):
                    if ApiToken.update(revoked_at=now).where(
                        (ApiToken.id == child) & ApiToken.revoked_at.is_null()
                    ).execute():
                        events += self._append([_with_token(children, str(child))], now)
                        revoked.append(str(child))
            if revoked:
                self.narrowed(token_ids=revoked)
        _emit(events)
        return self.get_token(token_id, now)

    def rotate(
        self,
        old_id: str,
        new_id: str,
        new: NewToken,
        old_expires_at: int | None,
        revoke_old: bool,
        now: int,
        audit: Sequence[AuditEntry],
    ) -> tuple[TokenInfo, TokenInfo] | None:
        """Stores `new` as the replacement of `old_id` in one transaction.

        The old token gets replaced_by_id, its new expiry (or revoked_at when
        `revoke_old`), and hands its children to the new token. None, and
        nothing written, if the old token was meanwhile revoked, expired or
        replaced: two rotations of one token cannot both win.
        """
        old, new_key = uuid.UUID(old_id), uuid.UUID(new_id)
        changes: dict[Any, Any] = {ApiToken.replaced_by_id: new_key}
        if revoke_old:
            changes[ApiToken.revoked_at] = now
        else:
            changes[ApiToken.expires_at] = old_expires_at
        try:
            with self.db.atomic():
                ApiToken.insert(**_new_token_row(new_key, new)).execute()
                updated = ApiToken.update(changes).where(
                    (ApiToken.id == old)
                    & ApiToken.replaced_by_id.is_null()
                    & ApiToken.revoked_at.is_null()
                    & (ApiToken.expires_at.is_null() | (ApiToken.expires_at > now))
                ).execute()
                if updated != 1:
                    raise _Refused
                ApiToken.update(parent_id=new_key).where(ApiToken.parent_id == old).execute()
                events = self._append(audit, now)
                # The old token now ends at the grace (or now): cached answers
                # for it carry the old expiry.
                self.narrowed(token_ids=[old_id])
        except _Refused:
            return None
        except peewee.IntegrityError:
            raise Conflict("lookup id taken") from None
        _emit(events)
        fresh, previous = self.get_token(new_id, now), self.get_token(old_id, now)
        assert fresh is not None and previous is not None
        return fresh, previous

    def update_token(
        self,
        token_id: str,
        changes: Mapping[str, Any],
        now: int,
        audit: AuditEntry,
        *,
        clamp_children_to: int | None = None,
    ) -> TokenInfo | None:
        """Applies `changes` (keys from UPDATABLE) unless the token was revoked meanwhile.

        With `clamp_children_to`, every descendant expiring later (or never) is
        given that expiry in the same transaction, so no child outlives its
        parent. None, and nothing written, if the token is revoked.
        """
        key = uuid.UUID(token_id)
        values: dict[Any, Any] = {}
        for name, value in changes.items():
            if name == "rate_limit":
                limit: RateLimit | None = value
                values[ApiToken.rate_limit_requests] = None if limit is None else limit.requests
                values[ApiToken.rate_limit_period_us] = None if limit is None else limit.period_us
            elif name == "scopes":
                values[ApiToken.scopes] = list(value)
            elif name in UPDATABLE:
                values[getattr(ApiToken, name)] = value
            else:
                raise ValueError(f"{name} is not updatable")
        try:
            with self.db.atomic():
                if values:
                    updated = ApiToken.update(values).where(
                        (ApiToken.id == key) & ApiToken.revoked_at.is_null()
                    ).execute()
                    if updated != 1:
                        raise _Refused
                # A new rate limit narrows too: a consumer's cached answer was given
                # a budget (or none, for a token without a limit) under the old one.
                narrowed = (
                    [token_id] if {"scopes", "expires_at", "rate_limit"} & changes.keys() else []
                )
                if clamp_children_to is not None:
                    below = self._subtree(key)
                    if below:
                        ApiToken.update(expires_at=clamp_children_to).where(
                            ApiToken.id.in_(below)
                            & (ApiToken.expires_at.is_null()
                               | (ApiToken.expires_at > clamp_children_to))
                        ).execute()
                        narrowed += [str(child) for child in below]
                events = self._append([audit], now)
                # Cached answers carry scopes and expiry: any change to them is
                # pushed (a widening too, harmlessly: the next answer is fresh).
                if narrowed:
                    self.narrowed(token_ids=narrowed)
        except _Refused:
            return None
        _emit(events)
        return self.get_token(token_id, now)

    def record_reuse(self, token_id: str, now: int, every_us: int, audit: AuditEntry) -> bool:
        """Records a rotated token's reuse, at most once per `every_us` per token.

        The conditional update decides across replicas which one writes the
        event; False when another did within the interval.
        """
        with self.db.atomic():
            changed = ApiToken.update(reuse_reported_at=now).where(
                (ApiToken.id == uuid.UUID(token_id))
                & (ApiToken.reuse_reported_at.is_null()
                   | (ApiToken.reuse_reported_at <= now - every_us))
            ).execute()
            events = self._append([audit], now) if changed else []
        _emit(events)
        return bool(changed)

    def list_tokens(
        self,
        *,
        org_id: str,
        user_id: str | None,
        after: Cursor | None,
        limit: int,
        now: int,
        state: TokenState | None = None,
        not_used_since: int | None = None,
    ) -> list[TokenInfo]:
        """Newest first, keyset-paginated on (created_at, id): no OFFSET, no COUNT.

        The filters are written as the partial indexes of migration 3 expect
        (revoked_at IS [NOT] NULL, expires_at and last_used_day as plain
        comparisons), so an org-wide list reads matching rows from an index in
        list order.
        """
        query = ApiToken.select(ApiToken, User).join(User).where(ApiToken.org_id == org_id)
        if user_id is not None:
            query = query.where(ApiToken.user == uuid.UUID(user_id))
        if state is TokenState.REVOKED:
            query = query.where(ApiToken.revoked_at.is_null(False))
        elif state is TokenState.EXPIRED:
            query = query.where(ApiToken.revoked_at.is_null() & (ApiToken.expires_at <= now))
        elif state is TokenState.ACTIVE:
            query = query.where(
                ApiToken.revoked_at.is_null()
                & (ApiToken.expires_at.is_null() | (ApiToken.expires_at > now))
            )
        if not_used_since is not None:
            query = query.where(
                (ApiToken.last_used_day <= not_used_since // DAY_MICROS)
                & (ApiToken.last_used_at.is_null() | (ApiToken.last_used_at < not_used_since))
            )
        if after is not None:
            # A row-value comparison, which both backends answer from the index;
            # values in a Tuple skip field conversion, so convert the id here.
            last_key = ApiToken.id.db_value(uuid.UUID(after.id))
            query = query.where(
                Tuple(ApiToken.created_at, ApiToken.id) < Tuple(after.created_at, last_key)
            )
        query = query.order_by(ApiToken.created_at.desc(), ApiToken.id.desc()).limit(limit)
        return [_token_info(t, now) for t in query]

    # The audit log.

    def _append(
        self, entries: Iterable[AuditEntry], now: int, *, token_id: str = ""
    ) -> list[AuditEventValue]:
        """Inserts events inside the caller's transaction; returns them as stored."""
        events = [
            AuditEventValue(
                id=str(uuid.uuid4()),
                time=from_micros(now),
                action=e.action,
                org_id=e.org_id,
                actor_user_id=e.actor.user_id,
                actor_email=e.actor.email,
                actor_token_id=e.actor.token_id,
                token_id=e.token_id or token_id,
                client_address=e.actor.client_address,
                details=_with_subject(e.details, e.actor.client_subject),
            )
            for e in entries
        ]
        if events:
            AuditEvent.insert_many([
                {
                    "id": uuid.UUID(e.id),
                    "time": now,
                    "action": e.action,
                    "org_id": e.org_id,
                    "actor_user_id": e.actor_user_id,
                    "actor_email": e.actor_email,
                    "actor_token_id": e.actor_token_id,
                    "token_id": e.token_id,
                    "client_address": e.client_address[:200],
                    "details": json.dumps(e.details, sort_keys=True, separators=(",", ":")),
                }
                for e in events
            ]).execute()
        return events

    def append_audit(self, entries: Sequence[AuditEntry], now: int) -> None:
        """Writes events that record no change of their own (a leak report of a revoked token)."""
        with self.db.atomic():
            events = self._append(entries, now)
        _emit(events)

    def list_audit_events(
        self,
        *,
        org_id: str | None,
        after: Cursor | None,
        limit: int,
        token_id: str = "",
        action: str = "",
    ) -> list[AuditEventValue]:
        """Newest first, keyset-paginated on (time, id); org_id None: every org (the CLI)."""
        query = AuditEvent.select()
        if org_id is not None:
            query = query.where(AuditEvent.org_id == org_id)
        if token_id:
            query = query.where(AuditEvent.token_id == token_id)
        if action:
            query = query.where(AuditEvent.action == action)
        if after is not None:
            last_key = AuditEvent.id.db_value(uuid.UUID(after.id))
            query = query.where(
                Tuple(AuditEvent.time, AuditEvent.id) < Tuple(after.created_at, last_key)
            )
        query = query.order_by(AuditEvent.time.desc(), AuditEvent.id.desc()).limit(limit)
        return [_audit_event(e) for e in query]

    def prune_audit(self, before: int, batch: int) -> int:
        """Deletes up to `batch` events older than `before` (micros); returns how many.

        Small batches, each its own short transaction, so pruning a large
        backlog never holds a long lock on the table the changes write to.
        """
        with self.db.atomic():
            oldest = (
                AuditEvent.select(AuditEvent.id)
                .where(AuditEvent.time < before)
                .order_by(AuditEvent.time)
                .limit(batch)
            )
            ids = [i for (i,) in oldest.tuples()]
            if not ids:
                return 0
            return AuditEvent.delete().where(AuditEvent.id.in_(ids)).execute()

    # Users.

    def add_user(
        self, email: str, org_id: str, permissions: Iterable[str], now: int,
        audit: AuditEntry | None = None,
    ) -> UserInfo:
        """Stores a user (and its audit event); `Conflict` if the email is taken."""
        user_id = uuid.uuid4()
        try:
            with self.db.atomic():
                user = User.create(
                    id=user_id, email=email, org_id=org_id,
                    permissions=list(permissions), created_at=now,
                )
                events = self._append([audit], now) if audit is not None else []
        except peewee.IntegrityError:
            raise Conflict("email taken") from None
        _emit(events)
        return _user_info(user)

    def find_user(self, email: str) -> UserInfo | None:
        user = User.get_or_none(User.email == email)
        return None if user is None else _user_info(user)

    def list_users(self, org_id: str | None) -> list[UserInfo]:
        query = User.select()
        if org_id is not None:
            query = query.where(User.org_id == org_id)
        return [_user_info(u) for u in query.order_by(User.org_id, User.email)]

    def set_user_disabled(
        self, email: str, disabled: bool, now: int = 0, audit: AuditEntry | None = None
    ) -> bool:
        """Whether a user with that email exists (and now has that state).

        The event is written only when the state changed.
        """
        with self.db.atomic():
            # The write first: on SQLite a transaction that read before it writes
            # fails at once ("database is locked") if another write committed meanwhile.
            changed = User.update(disabled=disabled).where(
                (User.email == email) & (User.disabled != disabled)
            ).execute()
            events = self._append([audit], now) if changed and audit is not None else []
            exists = changed > 0 or User.select().where(User.email == email).exists()
            if changed and disabled:
                self.narrowed(user_ids=[self._user_id(email)])
        _emit(events)
        return exists

    def set_user_permissions(
        self, email: str, permissions: Sequence[str], now: int, audit: AuditEntry
    ) -> bool:
        """Whether a user with that email exists (and now holds exactly `permissions`)."""
        with self.db.atomic():
            changed = User.update(permissions=list(permissions)).where(
                User.email == email
            ).execute()
            events = self._append([audit], now) if changed else []
            if changed:
                # Every token's scopes are cut to its user's permissions.
                self.narrowed(user_ids=[self._user_id(email)])
        _emit(events)
        return changed > 0

    def _user_id(self, email: str) -> str:
        return _uuid_str(User.select(User.id).where(User.email == email).scalar())

    def tokens_of_user(self, user_id: str, now: int) -> list[TokenInfo]:
        """Every token of one user, newest first (the command line's `token list`)."""
        query = (
            ApiToken.select(ApiToken, User).join(User)
            .where(ApiToken.user == uuid.UUID(user_id))
            .order_by(ApiToken.created_at.desc(), ApiToken.id.desc())
        )
        return [_token_info(t, now) for t in query]

    # Token events: what consumers caching Authenticate's answers must hear of.

    def narrowed(self, *, token_ids: Iterable[str] = (), user_ids: Iterable[str] = ()) -> Narrowed:
        """Writes the event for a change that narrows these tokens, or every token of these users.

        Call it inside the transaction making the change, as its last statement
        (on PostgreSQL it takes a lock held until commit), after the change's
        own writes (on SQLite a transaction that reads first cannot write once
        another write has committed): the event commits or rolls back with the
        change. It also records the event for the call's
        collector (narrowing.py), whose runner waits for the consumers.
        """
        tokens, users = tuple(token_ids), tuple(user_ids)
        if not dbmod.is_sqlite(self.db):
            self.db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (EVENTS_LOCK,))
        now = self.clock_micros()
        params = (now, json.dumps(list(tokens)), json.dumps(list(users)))
        if dbmod.is_sqlite(self.db):
            cursor = self.db.execute_sql(
                "INSERT INTO token_events (created_at, token_ids, user_ids) VALUES (?, ?, ?)",
                params,
            )
            event_id = int(cursor.lastrowid)
        else:
            cursor = self.db.execute_sql(
                "INSERT INTO token_events (created_at, token_ids, user_ids)"
                " VALUES (%s, %s, %s) RETURNING id",
                params,
            )
            event_id = int(cursor.fetchone()[0])
            # Delivered at commit, to every listening replica; none on rollback.
            self.db.execute_sql("SELECT pg_notify(%s, %s)", (EVENTS_CHANNEL, str(event_id)))
        event = Narrowed(event_id, now, tokens, users)
        narrowing.record(event)
        return event

    def clock_micros(self) -> int:
        """Now on the store's clock: PostgreSQL's for every replica alike, else this machine's."""
        if dbmod.is_sqlite(self.db):
            return time.time_ns() // 1000
        row = self.db.execute_sql(f"SELECT {_PG_NOW}").fetchone()
        return int(row[0])

    def last_event_id(self) -> int:
        row = self.db.execute_sql("SELECT COALESCE(MAX(id), 0) FROM token_events").fetchone()
        return int(row[0])

    def events_after(self, after: int, limit: int) -> list[Narrowed]:
        """Events with an id above `after`, oldest first."""
        p = self._param
        rows = self.db.execute_sql(
            "SELECT id, created_at, token_ids, user_ids FROM token_events"
            f" WHERE id > {p} ORDER BY id LIMIT {p}",
            (after, limit),
        ).fetchall()
        return [
            Narrowed(int(i), int(at), tuple(json.loads(t)), tuple(json.loads(u)))
            for i, at, t, u in rows
        ]

    def heartbeat(self, replica_id: str, watch_from: int, lease_us: int) -> None:
        """Says leases this process grants hold until at most now + lease_us (store clock)."""
        with self.db.atomic():
            now = self.clock_micros()
            LeaseReplica.insert(
                replica_id=replica_id, watch_from=watch_from, heartbeat_at=now,
                lease_until=now + lease_us,
            ).on_conflict(
                conflict_target=[LeaseReplica.replica_id],
                update={LeaseReplica.heartbeat_at: now, LeaseReplica.lease_until: now + lease_us},
            ).execute()

    def add_acks(self, replica_id: str, event_ids: Sequence[int]) -> None:
        """This process has delivered these events to every consumer it answers for."""
        with self.db.atomic():
            TokenEventAck.insert_many(
                [{"event_id": e, "replica_id": replica_id} for e in event_ids]
            ).on_conflict_ignore().execute()
            if not dbmod.is_sqlite(self.db):
                self.db.execute_sql("SELECT pg_notify(%s, '')", (ACKS_CHANNEL,))

    def unsettled(self, event_ids: Sequence[int], exclude_replica: str | None) -> set[int]:
        """The events some other process may still have to deliver.

        An event is settled once every process that was granting leases when it
        was written (lease_until after its created_at), and is answerable for it
        (watch_from below it), has acknowledged it or seen its lease_until pass
        with no fresh heartbeat. An event that does not exist (its transaction
        rolled back) is settled.
        """
        if not event_ids:
            return set()
        p = self._param
        if dbmod.is_sqlite(self.db):
            now, params = p, (self.clock_micros(),)
        else:  # the store's clock, in the same round trip
            now, params = _PG_NOW, ()
        marks = ", ".join([p] * len(event_ids))
        rows = self.db.execute_sql(
            "SELECT DISTINCT e.id FROM token_events e"
            " JOIN lease_replicas r ON r.lease_until > e.created_at"
            f"  AND r.lease_until > {now} AND r.watch_from < e.id AND r.replica_id <> {p}"
            " LEFT JOIN token_event_acks a ON a.event_id = e.id AND a.replica_id = r.replica_id"
            f" WHERE e.id IN ({marks}) AND a.event_id IS NULL",
            (*params, exclude_replica or "", *event_ids),
        ).fetchall()
        return {int(r[0]) for r in rows}

    def prune_events(self, older_than_us: int, batch: int) -> int:
        """Deletes up to `batch` old events (never the newest) with their acks; returns how many."""
        p = self._param
        # IMMEDIATE on SQLite: this transaction reads before it writes.
        with self.db.atomic("IMMEDIATE") if dbmod.is_sqlite(self.db) else self.db.atomic():
            newest = self.last_event_id()
            rows = self.db.execute_sql(
                f"SELECT id FROM token_events WHERE created_at < {p} AND id < {p}"
                f" ORDER BY id LIMIT {p}",
                (older_than_us, newest, batch),
            ).fetchall()
            if not rows:
                return 0
            top = max(int(r[0]) for r in rows)
            self.db.execute_sql(f"DELETE FROM token_events WHERE id <= {p}", (top,))
            self.db.execute_sql(f"DELETE FROM token_event_acks WHERE event_id <= {p}", (top,))
            self.db.execute_sql(
                f"DELETE FROM lease_replicas WHERE lease_until < {p}", (older_than_us,)
            )
        return len(rows)

    @property
    def _param(self) -> str:
        return "?" if dbmod.is_sqlite(self.db) else "%s"

    def listener(self) -> EventListener | None:
        """A connection of its own that hears events and acks as they commit (PostgreSQL only)."""
        if dbmod.is_sqlite(self.db):
            return None
        return EventListener(self.db.database, dict(self.db.connect_params))


class EventListener:
    """A dedicated PostgreSQL connection LISTENing for events and acks.

    Not pooled: it sits idle in LISTEN, which a pooled connection must not. A
    lost connection raises from wait(); the caller reconnects with `open()`.
    """

    def __init__(self, database: str, params: dict[str, Any]) -> None:
        self._database = database
        self._params = params
        self._conn: Any = None

    def open(self) -> None:
        import psycopg2

        self.close()
        try:
            conn = psycopg2.connect(database=self._database, **self._params)
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(f"LISTEN {EVENTS_CHANNEL}; LISTEN {ACKS_CHANNEL}")
        except psycopg2.Error as e:
            raise Unavailable(dbmod.UNAVAILABLE_MESSAGE) from e
        self._conn = conn

    def wait(self, timeout: float) -> set[str]:
        """The channels notified within `timeout` seconds (empty if none)."""
        import psycopg2

        if self._conn is None:
            self.open()
        conn = self._conn
        try:
            if not conn.notifies:
                ready, _, _ = select.select([conn], [], [], timeout)
                if not ready:
                    return set()
            conn.poll()
        except (psycopg2.Error, OSError, ValueError) as e:
            self.close()
            raise Unavailable(dbmod.UNAVAILABLE_MESSAGE) from e
        channels = {n.channel for n in conn.notifies}
        conn.notifies.clear()
        return channels

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - closing a connection that is already gone
                pass
            self._conn = None


def _new_token_row(token_id: uuid.UUID, new: NewToken) -> dict[str, Any]:
    limit = new.rate_limit
    return {
        "id": token_id,
        "lookup_id": new.lookup_id,
        "token_prefix": new.token_prefix,
        "secret_hash": new.secret_hash,
        "name": new.name,
        "scopes": list(new.scopes),
        "expires_at": new.expires_at,
        "created_at": new.created_at,
        "user": uuid.UUID(new.user_id),
        "org_id": new.org_id,
        "parent_id": None if new.parent_id is None else uuid.UUID(new.parent_id),
        "rotated_from_id": None if new.rotated_from_id is None else uuid.UUID(new.rotated_from_id),
        "rate_limit_requests": None if limit is None else limit.requests,
        "rate_limit_period_us": None if limit is None else limit.period_us,
    }


def _with_token(entry: AuditEntry, token_id: str) -> AuditEntry:
    return AuditEntry(entry.action, entry.org_id, entry.actor, token_id, entry.details)


def _emit(events: Iterable[AuditEventValue]) -> None:
    """One JSON log line per committed audit event."""
    if not audit_log.isEnabledFor(logging.INFO):
        return
    for e in events:
        audit_log.info("audit", extra={
            "event_id": e.id,
            "event_time": e.time.isoformat().replace("+00:00", "Z"),
            "action": e.action,
            "org_id": e.org_id,
            "actor_user_id": e.actor_user_id,
            "actor_email": e.actor_email,
            "actor_token_id": e.actor_token_id,
            "token_id": e.token_id,
            "client_address": e.client_address,
            "details": e.details,
        })


def _with_subject(details: Mapping[str, Any], subject: str) -> dict[str, Any]:
    """An event's details, with the caller's verified certificate subject when it had one."""
    if not subject:
        return dict(details)
    return {**details, "client_subject": subject[:512]}


def _token_info(token: ApiToken, now: int) -> TokenInfo:
    requests, period = token.rate_limit_requests, token.rate_limit_period_us
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
        state=token_state(
            ApiToken.revoked_at.db_value(token.revoked_at),
            ApiToken.expires_at.db_value(token.expires_at),
            now,
        ),
        parent_id=_opt_str(token.parent_id),
        rotated_from_id=_opt_str(token.rotated_from_id),
        replaced_by_id=_opt_str(token.replaced_by_id),
        rate_limit=None if requests is None or period is None else RateLimit(requests, period),
    )


def _audit_event(event: AuditEvent) -> AuditEventValue:
    return AuditEventValue(
        id=str(event.id),
        time=from_micros(event.time),
        action=event.action,
        org_id=event.org_id,
        actor_user_id=event.actor_user_id,
        actor_email=event.actor_email,
        actor_token_id=event.actor_token_id,
        token_id=event.token_id,
        client_address=event.client_address,
        details=json.loads(event.details),
    )


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


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


def _auth_row(row: Sequence[Any]) -> AuthRow:
    """The hot path's row (token and user columns, in the query's order) as an AuthRow."""
    tid, secret_hash, scopes, expires, revoked, uid, email, org, perms, disabled, \
        replaced_by, limit_requests, limit_period_us = row
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
        replaced_by_id=None if replaced_by is None else _uuid_str(replaced_by),
        rate_limit_requests=limit_requests,
        rate_limit_period_us=limit_period_us,
    )


__all__ = ["Store"]

