"""Reads and writes of users and tokens: the only module of the rules' side that knows peewee.

It owns transactions, turns driver integrity errors into `Conflict`, and
returns plain values (values.py), never model objects. Migrations build their
own queries on purpose: they must keep doing what they did when written,
whatever this module and the models become.
"""

from __future__ import annotations

import json
import select
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import peewee
from peewee import Tuple

from . import db as dbmod
from . import narrowing
from .errors import Conflict, Unavailable
from .models import ApiToken, LeaseReplica, TokenEventAck, User
from .values import AuthRow, Cursor, Narrowed, NewToken, TokenInfo, UserInfo

# PostgreSQL: narrowing transactions take this advisory lock just before they
# write their event, so events commit in id order and "every event after the
# last one read" misses none (a sequence alone hands out ids in one order and
# transactions may commit in another).
EVENTS_LOCK = 7401284
EVENTS_CHANNEL = "tokenservice_token_events"
_PG_NOW = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::bigint"
ACKS_CHANNEL = "tokenservice_token_event_acks"


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
            changed = ApiToken.update(revoked_at=now).where(
                (ApiToken.id == uuid.UUID(token_id)) & ApiToken.revoked_at.is_null()
            ).execute()
            if changed:
                self.narrowed(token_ids=[token_id])
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
            # The write first: on SQLite a transaction that read before it writes
            # fails at once ("database is locked") if another write committed meanwhile.
            if User.update(disabled=disabled).where(User.email == email).execute() == 0:
                return False
            if disabled:
                user_id = User.select(User.id).where(User.email == email).scalar()
                self.narrowed(user_ids=[_uuid_str(user_id)])
            return True

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
