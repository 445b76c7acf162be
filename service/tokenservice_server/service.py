"""The rules of tokenservice: plain functions of plain values, no grpc, protobuf or peewee."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import contextvars
import hashlib
import logging
import threading
import time
import unicodedata
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn

from . import tokens
from .config import Config
from .crypto import SecretHasher, VerifiedCache
from .errors import (
    AUTH_FAILED,
    TOKEN_RATE_LIMITED,
    AlreadyExists,
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
    Unavailable,
    shown,
)
from .fairshare import Claimant
from .ratelimit import Decision, LimitStore, RateLimiter, open_store
from .scopes import ADMIN, MANAGE, VERIFY, ScopeCatalog, why_not_canonical
from .store import Store
from .throttle import FailureBuckets, client_keys
from .usage import UsageRecorder
from .values import (
    CLI_ACTOR,
    DAY_MICROS,
    UPDATABLE,
    Actor,
    AuditEntry,
    AuditEvent,
    AuditPage,
    AuthRow,
    CachedUse,
    CreatedToken,
    Cursor,
    LeakResult,
    NewToken,
    Principal,
    RateLimit,
    RateLimitStatus,
    RotatedToken,
    TokenInfo,
    TokenPage,
    TokenState,
    UserInfo,
    from_micros,
    to_micros,
)

log = logging.getLogger("tokenservice.service")

# Set by the caller of authenticate(): the call comes from a lease cache, which
# asks for a cache budget (RateLimitStatus.cache_budget) with its answer.
wants_cache_budget: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "wants_cache_budget", default=False
)

# Set by the caller of a rule that writes audit events: the subject of the client
# certificate the caller presented and the server verified (mTLS); "" for none.
client_subject: contextvars.ContextVar[str] = contextvars.ContextVar(
    "client_subject", default=""
)

DEFAULT_PAGE_SIZE = 50
MAX_USES_PER_REPORT = 10_000
# How long a token's limit read for charging usage reports is reused, and for how many tokens.
REPORT_LIMIT_SECONDS = 10
REPORT_LIMITS_KEPT = 10_000
MAX_PAGE_SIZE = 1000
MAX_NAME_LENGTH = 200
BIDI_FORMATTING = frozenset(
    chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))
)
MALFORMED_REQUEST = "the request is not a valid message for this method"
# A client address, or a function giving it: only the failure paths need it,
# so the gRPC layer passes it lazily.
Client = str | Callable[[], str]

# Rotation: how long the old token may keep working.
MAX_GRACE_US = 7 * DAY_MICROS
# A rotated token's old secret presented again is recorded at most this often.
REUSE_REPORT_EVERY_US = 60_000_000
MAX_LEAK_REPORT = 100
MAX_SOURCE_LENGTH = 2048
MAX_RATE_LIMIT_PERIOD_US = 366 * DAY_MICROS
MAX_RATE_LIMIT_REQUESTS = 2**31 - 1

# Every action the audit log records.
AUDIT_ACTIONS = (
    "token.create",
    "token.update",
    "token.rotate",
    "token.revoke",
    "token.leak_reported",
    "token.reuse_after_rotation",
    "user.add",
    "user.update",
    "user.disable",
    "user.enable",
)


class _ReusedAfterRotation(Exception):
    """A rotated token's right secret after its grace: refused, and worth recording."""

    def __init__(self, row: AuthRow, reason: str) -> None:
        super().__init__("reused after rotation")
        self.row = row
        self.reason = reason  # revoked or expired, for the outcome metric


def _client(client: Client) -> str:
    return client() if callable(client) else client


def _actor(caller: Principal, client: Client) -> Actor:
    return Actor(caller.user_id, caller.email, caller.token_id, _client(client),
                 client_subject.get())


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def _limit_details(limit: RateLimit | None) -> dict[str, Any] | None:
    if limit is None:
        return None
    return {"requests": limit.requests, "period_seconds": limit.period_us / 1e6}


def _throttled(wait: float) -> RateLimited:
    """Refusal of a client address that keeps failing: the gRPC layer may tarpit it."""
    error = RateLimited("too many failed authentications, slow down", wait)
    error.client_throttled = True
    return error


def _client_keys(client: Client) -> tuple[str, ...]:
    """The throttle buckets of a client address (resolved now if given lazily)."""
    return client_keys(_client(client))


def now_micros() -> int:
    return time.time_ns() // 1000


# Namespaces of the one LimitStore: per-token limits, failure throttles per
# client address and per lookup id. Redis keys carry them (tokenservice:rl:<ns>:).
TOKEN_LIMITS = "token"
CLIENT_FAILURES = "auth-client"
LOOKUP_FAILURES = "auth-lookup"


@dataclass(frozen=True, slots=True)
class _PendingCheck:
    """A token found, its secret not yet verified: one hash check is owed."""

    lookup_id: str
    secret: str
    row: AuthRow
    digest: bytes
    claimant: Claimant  # whom the check is for: the hasher shares its threads by it


@dataclass(frozen=True, slots=True)
class _Granted:
    """A token found and good, its call still to count against its rate limit."""

    row: AuthRow
    now: int
    requests: int
    period_s: float


def validate_name(name: str) -> tuple[str | None, str | None]:
    """Returns (clean name, None) or (None, why it is refused)."""
    clean = name.strip()
    if not clean:
        return None, "is required"
    if len(clean) > MAX_NAME_LENGTH:
        return None, f"must be at most {MAX_NAME_LENGTH} characters"
    for ch in clean:
        if unicodedata.category(ch) == "Cc":
            return None, "must not contain control characters"
        if ch in BIDI_FORMATTING:
            return None, "must not contain bidirectional formatting characters"
    return clean, None


# A page token is base64url("1:<created_at micros>:<token id hex>[:<filters>]").
# It is not signed: it is only a position in the caller's own listing, whose
# query is still cut to the caller's reach, so a forged one shows nothing the
# caller could not list anyway, and replicas need no shared key to read each
# other's. What a forged one must never do is reach the driver with a value it
# cannot take (a created_at past 2**63 was a 500 on SQLite): every field is
# checked against its range, and only the exact encoding this service writes
# is read.
PAGE_TOKEN_VERSION = "1"
MAX_PAGE_TOKEN_CHARS = 120
LATEST_MICROS = to_micros(datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC))


def _fingerprint(filters: str) -> str:
    """What a page token remembers of its filters: enough to tell them apart."""
    return hashlib.sha256(filters.encode()).hexdigest()[:16] if filters else ""


def encode_page_token(cursor: Cursor, filters: str = "") -> str:
    """An opaque cursor, bound to `filters` (a canonical string of the list's filters)."""
    text = f"{PAGE_TOKEN_VERSION}:{cursor.created_at}:{uuid.UUID(cursor.id).hex}"
    if filters:
        text += ":" + _fingerprint(filters)
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_page_token(page_token: str, filters: str = "") -> Cursor:
    """The cursor of a page token issued with the same `filters`; InvalidArgument else."""
    bad = InvalidArgument([("page_token", "is not a page token this service issued")])
    if len(page_token) > MAX_PAGE_TOKEN_CHARS:
        raise bad
    try:
        padded = page_token + "=" * (-len(page_token) % 4)
        version, created, token_hex, *bound = (
            base64.urlsafe_b64decode(padded.encode("ascii")).decode("ascii").split(":")
        )
        cursor = Cursor(int(created), str(uuid.UUID(hex=token_hex)))
    except (ValueError, UnicodeError, binascii.Error):
        raise bad from None
    if (
        version != PAGE_TOKEN_VERSION
        or len(bound) > 1
        or not 0 <= cursor.created_at <= LATEST_MICROS
    ):
        raise bad
    if (bound[0] if bound else "") != _fingerprint(filters):
        raise InvalidArgument([(
            "page_token",
            "was issued for other filters: repeat the filters of the first page, or start over",
        )])
    # One spelling per cursor: no signs, spaces, leading zeros or other padding.
    if encode_page_token(cursor, filters) != page_token:
        raise bad
    return cursor


class TokenService:
    """Create, list, get, revoke and authenticate, over a Store and a SecretHasher.

    The synchronous methods run inside a connection their caller holds
    (`store.connection()`: one per RPC, or per command); `aauthenticate` manages
    its own, because it decides itself what runs on the event loop.

    Per-token rate limits and the failed-authentication throttles keep their
    counters in one LimitStore (`limits`): Redis when the config names one, so
    every replica and worker process draws on the same budgets, else this
    process's own counters.
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        catalog: ScopeCatalog,
        hasher: SecretHasher,
        usage: UsageRecorder | None = None,
        clock: Callable[[], int] = now_micros,
        blocking: Executor | None = None,
        auth_store: Store | None = None,
        limits: LimitStore | None = None,
    ) -> None:
        self.config = config
        self.store = store
        # Where aauthenticate reads, on `blocking`: a Store of its own connections
        # (PostgreSQL), so management work holding every connection of `store`
        # never holds up an Authenticate.
        self.auth_store = store if auth_store is None else auth_store
        self.catalog = catalog
        self.hasher = hasher
        self.usage = usage
        self.clock = clock
        # Where aauthenticate runs a store read that may not block the loop.
        self.blocking = blocking
        self.verified = VerifiedCache(config.verified_cache_size)
        self._owns_limits = limits is None
        self.limits = limits if limits is not None else open_store(
            config.redis_url, config.redis_timeout_seconds
        )
        # aauthenticate counts a call against a remote store in batches, on `blocking`.
        self.limiter = RateLimiter(self.limits, TOKEN_LIMITS, blocking)
        self.client_failures = FailureBuckets(
            config.auth_failure_burst, config.auth_failure_refill_per_second,
            store=self.limits, namespace=CLIENT_FAILURES,
        )
        self.lookup_failures = FailureBuckets(
            config.lookup_failure_burst, config.lookup_failure_refill_per_second,
            store=self.limits, namespace=LOOKUP_FAILURES,
        )
        # token id -> (its limit or None, when read): the limits usage reports
        # are charged against, read once in a while rather than per report.
        self._report_limits: OrderedDict[str, tuple[tuple[int, float] | None, int]] = (
            OrderedDict()
        )
        self._report_limits_lock = threading.Lock()
        # A remote limit store is a network round trip: aauthenticate keeps every
        # call to it off the event loop's thread.
        self._inline_limits = not self.limits.remote
        # Token ids whose reuse after rotation this process recorded lately: the
        # store's conditional write decides across replicas; this spares it the
        # write when one client keeps presenting an old secret.
        self._reuse_seen: OrderedDict[str, int] = OrderedDict()
        self._reuse_lock = threading.Lock()
        # Likewise, revoked tokens reported as leaked again lately (their audit events).
        self._leaks_seen: OrderedDict[str, int] = OrderedDict()
        # Tokens being created (CreateToken) per calling token.
        self._minting: dict[str, int] = {}
        self._minting_lock = threading.Lock()

    def close(self) -> None:
        self.hasher.close()
        if self._owns_limits:
            self.limits.close()

    # Authenticate: the hot path.

    def authenticate(self, raw_token: str, client: Client = "", *, limited: bool = True
                     ) -> Principal:
        """Verifies a raw token. Every failure raises Unauthenticated(AUTH_FAILED).

        Cost: a checksum, one indexed read of token and user, and either a
        cache hit or exactly one hash check. Revocation, expiry and the user's
        state come from that read, so they hold on every call. With `limited`
        (the Authenticate RPC) the call counts against the token's rate limit;
        a management call's own caller does not.
        """
        try:
            step = self._begin(raw_token, client, limited)
            if isinstance(step, _PendingCheck):
                ok = self.hasher.verify(step.secret, step.row.secret_hash, step.claimant)
                step = self._finish(step, ok, client, limited)
            assert not isinstance(step, _Granted)
            return step
        except _ReusedAfterRotation as reuse:
            # The caller holds a connection: record within it.
            self._record_reuse(reuse.row, client)
            raise Unauthenticated(AUTH_FAILED, reuse.reason) from None

    async def aauthenticate(self, raw_token: str, client: Client = "", *,
                            limited: bool = True) -> Principal:
        """authenticate() for an event loop; nothing that waits runs on the loop's thread.

        The one read runs on the loop's thread when the store answers it from
        memory (SQLite) or through asynchronous connections (PostgreSQL, with
        `Store.read_on_loop`), else on `blocking`. With limits in this process the
        rest is CPU and runs there too. With a remote limit store (Redis) the
        warm path (a known token whose secret was verified before) counts the
        call through the limiter's batches, which go to Redis off the loop's
        thread; the failure throttles (an unknown token, a secret still to
        check) run on `blocking`. The hash check runs on the hasher's threads.
        No connection is held across an await: peewee's connection state is
        per thread, and other calls run on the loop meanwhile.
        """

        def read() -> tuple[tokens.ParsedToken | None, AuthRow | None]:
            with self.auth_store.connection():
                return self._read(raw_token, self.auth_store)

        loop = asyncio.get_running_loop()
        if self.auth_store.inline_reads:
            parsed, row = read()
        elif self.auth_store.loop_reads is not None:  # PostgreSQL, on the loop: pgasync.py
            parsed = tokens.parse(raw_token, self.config.token_prefix)
            row = await self.auth_store.afind_for_auth(parsed.lookup_id) if parsed else None
        else:
            parsed, row = await loop.run_in_executor(
                self.blocking, contextvars.copy_context().run, read
            )
        try:
            return await self._after_read(parsed, row, client, limited)
        except _ReusedAfterRotation as reuse:
            # A write, rare (once a minute per token at most): never on the loop.
            address, found = _client(client), reuse.row

            def record() -> None:
                with self.store.connection():
                    self._record_reuse(found, address)

            await loop.run_in_executor(self.blocking, contextvars.copy_context().run, record)
            raise Unauthenticated(AUTH_FAILED, reuse.reason) from None

    async def _after_read(self, parsed: tokens.ParsedToken | None, row: AuthRow | None,
                          client: Client, limited: bool) -> Principal:
        """aauthenticate() past its read: throttles, the hash check, the state, the limit."""
        loop = asyncio.get_running_loop()
        if self._inline_limits:
            step = self._decide(parsed, row, client, limited)
        elif parsed is not None and row is not None and self.verified.is_verified(
            self.verified.digest(parsed.lookup_id, parsed.secret), row.secret_hash
        ):
            step = self._grant(row, limited, defer=True)  # no throttle to ask: no I/O
        else:
            # Worked out here, on the loop: where it comes from (an RPC's context)
            # may not be touched from the executor's thread.
            client = _client(client)
            step = await loop.run_in_executor(
                self.blocking, contextvars.copy_context().run,
                self._decide, parsed, row, client, limited, True,
            )
        if isinstance(step, _PendingCheck):
            try:
                ok = await self.hasher.averify(
                    step.secret, step.row.secret_hash, step.claimant
                )
            except RateLimited as busy:
                # A client that has failed lately, refused a place in the hash
                # queue: held back like any throttled refusal, or it would spin.
                busy.client_throttled = step.claimant.failing
                raise
            if self._inline_limits:
                step = self._finish(step, ok, client, limited)
            else:
                client = _client(client)
                step = await loop.run_in_executor(
                    self.blocking, contextvars.copy_context().run,
                    self._finish, step, ok, client, limited, True,
                )
        if isinstance(step, _Granted):
            return await self._acount(step)
        return step

    def _begin(self, raw_token: str, client: Client, limited: bool = True
               ) -> Principal | _PendingCheck:
        """The store part: a Principal, or the hash check still owed."""
        parsed, row = self._read(raw_token)
        step = self._decide(parsed, row, client, limited)
        assert not isinstance(step, _Granted)
        return step

    def _read(self, raw_token: str, store: Store | None = None
              ) -> tuple[tokens.ParsedToken | None, AuthRow | None]:
        """The one database read: the token and its user (none for a malformed token)."""
        parsed = tokens.parse(raw_token, self.config.token_prefix)
        row = (store or self.store).find_for_auth(parsed.lookup_id) if parsed else None
        return parsed, row

    def _decide(
        self,
        parsed: tokens.ParsedToken | None,
        row: AuthRow | None,
        client: Client,
        limited: bool,
        defer: bool = False,
    ) -> Principal | _PendingCheck | _Granted:
        """After the read (no database access): a refusal, a grant, or a hash check owed."""
        if parsed is None or row is None:
            self._fail(client, None)
        digest = self.verified.digest(parsed.lookup_id, parsed.secret)
        if not self.verified.is_verified(digest, row.secret_hash):
            claimant = self._may_try_secret(client, parsed.lookup_id, row.org_id)
            return _PendingCheck(parsed.lookup_id, parsed.secret, row, digest, claimant)
        return self._grant(row, limited, defer)

    def _finish(self, step: _PendingCheck, ok: bool, client: Client, limited: bool = True,
                defer: bool = False) -> Principal | _Granted:
        """After the hash check: no database access (limits and throttles only)."""
        if not ok:
            self._fail(client, step.lookup_id)
        self.verified.add(step.digest, step.row.secret_hash)
        return self._grant(step.row, limited, defer)

    def _grant(self, row: AuthRow, limited: bool = True, defer: bool = False
               ) -> Principal | _Granted:
        """The token's state, then its rate limit; `defer`: leave the count to _acount."""
        now = self.clock()
        # The secret was right, so none of these is guessing: nothing to throttle.
        reason = None
        if row.revoked_at is not None:
            reason = "revoked"
        elif row.expires_at is not None and row.expires_at <= now:
            reason = "expired"
        elif row.disabled:
            reason = "disabled"
        if reason is not None:
            if row.replaced_by_id is not None and not row.disabled:
                raise _ReusedAfterRotation(row, reason)
            raise Unauthenticated(AUTH_FAILED, reason)
        if self.usage is not None:
            self.usage.record(row.token_id, now)
        limit = self._limit_of(row) if limited else None
        if limit is None:
            return self._principal(row, None)
        if defer:
            return _Granted(row, now, *limit)
        decision = self.limiter.check(row.token_id, *limit, cache=wants_cache_budget.get())
        return self._principal(row, self._status(decision, now))

    async def _acount(self, granted: _Granted) -> Principal:
        """Counts a granted call against its limit through the limiter's batches."""
        decision = await self.limiter.acheck(
            granted.row.token_id, granted.requests, granted.period_s,
            cache=wants_cache_budget.get(),
        )
        return self._principal(granted.row, self._status(decision, granted.now))

    def _limit_of(self, row: AuthRow) -> tuple[int, float] | None:
        """(requests, period in seconds): the token's own limit, else the default; None: none."""
        requests, period_us = row.rate_limit_requests, row.rate_limit_period_us
        if requests is not None and period_us is not None and 1 <= requests <= period_us:
            return requests, period_us / 1_000_000
        default = self.config.rate_limit
        return None if default is None else (default.requests, default.period_s)

    @staticmethod
    def _status(decision: Decision, now: int) -> RateLimitStatus:
        """An allowed call's standing; a refused one raises RateLimited(TOKEN_RATE_LIMITED).

        That refusal is no failed authentication (the secret was right): no
        throttle is charged and no tarpit waits.
        """
        if not decision.allowed:
            raise RateLimited(
                "this token is over its rate limit; retry later",
                decision.retry_after_s,
                reason=TOKEN_RATE_LIMITED,
            )
        return RateLimitStatus(
            decision.limit, decision.remaining, now + round(decision.reset_after_s * 1_000_000),
            decision.cache_budget,
        )

    @staticmethod
    def _principal(row: AuthRow, status: RateLimitStatus | None) -> Principal:
        permissions = set(row.permissions)
        return Principal(
            token_id=row.token_id,
            user_id=row.user_id,
            email=row.email,
            org_id=row.org_id,
            scopes=tuple(s for s in row.scopes if s in permissions),
            expires_at=None if row.expires_at is None else from_micros(row.expires_at),
            rate_limit=status,
        )

    def _fail(self, client: Client, lookup_id: str | None) -> None:
        keys = _client_keys(client)
        wait = self._client_wait(keys)
        if wait > 0 and lookup_id is None:
            raise _throttled(wait)
        self._client_failed(keys)
        if lookup_id is not None:
            self.lookup_failures.fail(lookup_id)
        raise Unauthenticated(AUTH_FAILED)

    def _may_try_secret(self, client: Client, lookup_id: str, org_id: str) -> Claimant:
        """Whether this client gets a hash check of a secret for this token now,
        and whom that check is for.

        A token nobody has failed at lately is checked for anyone, so a flood of
        bad tokens from a client never stops that client's good ones. A token
        being guessed at (its lookup-id bucket empty) is still checked for a
        client that has not failed lately: the lookup id is no secret (most of it
        is the displayed prefix), so refusing everyone would let anyone lock any
        token out. Clients that have failed lately are refused there, and the
        refusal is charged to them and tarpitted: guessing costs the guesser,
        never the token's owner.
        """
        keys = _client_keys(client)
        clean = self._client_clean(keys)
        # The hasher's queues are per client: an IPv6 client's is its /64's.
        claimant = Claimant(org_id, keys[-1], failing=not clean)
        if clean or self.lookup_failures.untouched(lookup_id):
            return claimant
        wait = self._client_wait(keys)
        if wait > 0:
            raise _throttled(wait)
        lookup_wait = self.lookup_failures.retry_after(lookup_id)
        if lookup_wait > 0:
            self._client_failed(keys)
            raise _throttled(max(lookup_wait, self._client_wait(keys)))
        return claimant

    def _record_reuse(self, row: AuthRow, client: Client) -> None:
        """Writes token.reuse_after_rotation, at most once a minute per token.

        Runs inside the caller's connection. A store failure is logged, not
        raised: the caller is refused either way.
        """
        now = self.clock()
        with self._reuse_lock:
            seen = self._reuse_seen.get(row.token_id)
            if seen is not None and now - seen < REUSE_REPORT_EVERY_US:
                return
            self._reuse_seen[row.token_id] = now
            self._reuse_seen.move_to_end(row.token_id)
            while len(self._reuse_seen) > 10_000:
                self._reuse_seen.popitem(last=False)
        entry = AuditEntry(
            "token.reuse_after_rotation",
            row.org_id,
            Actor(client_address=_client(client)),
            row.token_id,
            {"replaced_by_id": row.replaced_by_id},
        )
        try:
            self.store.record_reuse(row.token_id, now, REUSE_REPORT_EVERY_US, entry)
        except Unavailable:
            log.warning("could not record a rotated token's reuse",
                        extra={"token_id": row.token_id})

    def refuse_malformed(self, client: Client) -> NoReturn:
        """A request that did not parse: refused with one fixed message, and counted
        as a failure of its client, as a bad token is (a throttled client is refused
        as throttled)."""
        keys = _client_keys(client)
        wait = self._client_wait(keys)
        if wait > 0:
            raise _throttled(wait)
        self._client_failed(keys)
        raise InvalidArgument([], MALFORMED_REQUEST)

    def tarpitted(self, client: Client, seconds: float) -> None:
        """A throttled client was kept waiting: its wait does not refill its buckets."""
        for key in _client_keys(client):
            self.client_failures.hold(key, seconds)

    def _client_wait(self, keys: tuple[str, ...]) -> float:
        """Seconds until the client may fail again: its address's or its /64's, the longer."""
        return max(self.client_failures.retry_after(key) for key in keys)

    def _client_clean(self, keys: tuple[str, ...]) -> bool:
        """True when the client has no failures that have not refilled yet."""
        return all(self.client_failures.untouched(key) for key in keys)

    def _client_failed(self, keys: tuple[str, ...]) -> None:
        for key in keys:
            self.client_failures.fail(key)

    # Management: the caller is a Principal from authenticate(). `client` is
    # the caller's address, for the audit log.

    def _require_manage(self, caller: Principal) -> None:
        if MANAGE not in caller.scopes:
            raise PermissionDenied(f"this call needs the scope {MANAGE}")

    def _in_reach(self, caller: Principal, token: TokenInfo | None) -> TokenInfo:
        if (
            token is None
            or token.org_id != caller.org_id
            or (token.user_id != caller.user_id and ADMIN not in caller.scopes)
        ):
            raise NotFound("no such token")
        return token

    def create_token(
        self,
        caller: Principal,
        name: str,
        scopes: Sequence[str],
        expires_at: datetime | None,
        rate_limit: RateLimit | None = None,
        client: Client = "",
    ) -> CreatedToken:
        """A token for the caller's user, minted by the caller's token (its parent)."""
        self._require_manage(caller)
        with self._minting_slot(caller):
            return self.mint(
                caller.user_id, caller.org_id, caller.scopes, name, scopes, expires_at,
                rate_limit=rate_limit, parent=caller, actor=_actor(caller, client),
            )

    @contextlib.contextmanager
    def _minting_slot(self, caller: Principal) -> Iterator[None]:
        """One of the caller token's few concurrent mints, or RateLimited.

        Minting costs a bcrypt hash and a transaction; without a bound, one
        caller's flood of CreateToken takes every management worker and
        connection while the rest of the org waits behind it.
        """
        limit = self.config.create_token_concurrency
        with self._minting_lock:
            running = self._minting.get(caller.token_id, 0)
            if running >= limit:
                raise RateLimited(
                    f"this token is already creating {limit} tokens; retry when one is done",
                    retry_after=1.0,
                )
            self._minting[caller.token_id] = running + 1
        try:
            yield
        finally:
            with self._minting_lock:
                left = self._minting[caller.token_id] - 1
                if left:
                    self._minting[caller.token_id] = left
                else:
                    del self._minting[caller.token_id]

    def mint(
        self,
        user_id: str,
        org_id: str,
        held: Sequence[str],
        name: str,
        scopes: Sequence[str],
        expires_at: datetime | None,
        *,
        rate_limit: RateLimit | None = None,
        parent: Principal | None = None,
        actor: Actor = CLI_ACTOR,
    ) -> CreatedToken:
        """Creates a token under the create rules; `held` is what the caller may grant.

        `parent` is the calling token, when there is one: the new token records
        it and may not outlive it.
        """
        violations: list[tuple[str, str]] = []
        clean_name, why = validate_name(name)
        if why:
            violations.append(("name", why))
        chosen = self._check_scopes(scopes, held, violations)
        now = self.clock()
        expires = None
        if expires_at is not None:
            expires = to_micros(expires_at)
            if expires <= now:
                violations.append(("expires_at", "must be in the future"))
        self._check_within_parent(
            expires, parent.expires_at if parent else None, "the calling token", "expires_at",
            violations,
        )
        self._check_rate_limit(rate_limit, "rate_limit", violations)
        if violations:
            raise InvalidArgument(violations)
        parent_id = parent.token_id if parent else None
        audit = AuditEntry("token.create", org_id, actor, details={
            "name": clean_name, "scopes": chosen, "expires_at": _iso(expires_at),
            "rate_limit": _limit_details(rate_limit), "parent_id": parent_id,
        })
        for attempt in range(3):
            raw, new = self._new_secret(
                name=clean_name or "", scopes=tuple(chosen), expires_at=expires,
                created_at=now, user_id=user_id, org_id=org_id, parent_id=parent_id,
                rate_limit=rate_limit,
            )
            try:
                return CreatedToken(raw=raw, info=self.store.insert_token(new, [audit], now))
            except Conflict:
                # A lookup id collision (about 2**-71): draw another.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _new_secret(self, **fields: Any) -> tuple[str, NewToken]:
        """A fresh raw token and the row that stores its hash (bcrypt: the slow part)."""
        raw, parts = tokens.new_token(self.config.token_prefix)
        # Hashing shares the bcrypt threads with checks, queued per org and user.
        claimant = Claimant(fields["org_id"], f"user:{fields['user_id']}")
        return raw, NewToken(
            lookup_id=parts.lookup_id,
            token_prefix=tokens.display_prefix(raw),
            secret_hash=self.hasher.hash(parts.secret, claimant),
            **fields,
        )

    @staticmethod
    def _check_within_parent(
        expires: int | None,
        parent_expires: datetime | None,
        parent_name: str,
        field: str,
        violations: list[tuple[str, str]],
    ) -> None:
        """The token tree's rule: a token never expires later than its parent."""
        if parent_expires is None:
            return
        limit = _iso(parent_expires)
        if expires is None:
            violations.append((
                field,
                f"is required: {parent_name} expires at {limit}, and a token under it may"
                " not outlive it",
            ))
        elif expires > to_micros(parent_expires):
            violations.append((field, f"must not be later than {parent_name}'s expiry, {limit}"))

    @staticmethod
    def _check_rate_limit(
        limit: RateLimit | None, field: str, violations: list[tuple[str, str]]
    ) -> None:
        if limit is None:
            return
        if not 0 < limit.requests <= MAX_RATE_LIMIT_REQUESTS:
            violations.append((f"{field}.requests", "must be more than zero"))
        if not 0 < limit.period_us <= MAX_RATE_LIMIT_PERIOD_US:
            violations.append((f"{field}.period", "must be more than zero and at most 366 days"))

    def _check_scopes(
        self,
        scopes: Sequence[str],
        held: Sequence[str],
        violations: list[tuple[str, str]],
        field: str = "scopes",
    ) -> list[str]:
        if not scopes:
            violations.append((field, "at least one scope is required"))
            return []
        # Exact comparisons only: what the store holds was written in the
        # catalog's spelling, and a request in any other spelling is refused.
        held_set = set(held)
        chosen: list[str] = []
        seen: set[str] = set()
        for requested in scopes:
            why = why_not_canonical(requested)
            scope = None if why else self.catalog.get(requested)
            if why:
                violations.append((field, f"{shown(requested)} {why}, so it is no scope name"))
            elif scope is None:
                violations.append((field, f"{shown(requested)} is not a known scope"))
            elif requested in seen:
                violations.append((field, f"{scope.name!r} is listed more than once"))
            elif requested not in held_set:
                violations.append(
                    (field, f"{scope.name!r} is not held by the caller, so it cannot be granted")
                )
            else:
                chosen.append(scope.name)
            seen.add(requested)
        return chosen

    @staticmethod
    def _page_size(page_size: int) -> int:
        if page_size < 0:
            raise InvalidArgument([("page_size", "must not be negative")])
        return min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)

    def list_tokens(
        self,
        caller: Principal,
        page_size: int,
        page_token: str,
        state: TokenState | None = None,
        not_used_since: datetime | None = None,
    ) -> TokenPage:
        """Newest first; `state` and `not_used_since` filter, and bind the page token."""
        self._require_manage(caller)
        size = self._page_size(page_size)
        unused = None if not_used_since is None else to_micros(not_used_since)
        filters = "" if state is None and unused is None else (
            f"tokens|{state.value if state else ''}|{'' if unused is None else unused}"
        )
        after = decode_page_token(page_token, filters) if page_token else None
        now = self.clock()
        rows = self.store.list_tokens(
            org_id=caller.org_id,
            user_id=None if ADMIN in caller.scopes else caller.user_id,
            after=after,
            limit=size + 1,
            now=now,
            state=state,
            not_used_since=unused,
        )
        page = rows[:size]
        next_token = ""
        if len(rows) > size:
            last = page[-1]
            next_token = encode_page_token(
                Cursor(to_micros(last.created_at), last.id), filters
            )
        return TokenPage(tuple(page), next_token)

    def get_token(self, caller: Principal, token_id: str) -> TokenInfo:
        self._require_manage(caller)
        if not token_id:
            raise InvalidArgument([("id", "is required")])
        return self._in_reach(caller, self.store.get_token(token_id, self.clock()))

    def revoke_token(
        self,
        caller: Principal,
        token_id: str,
        revoke_children: bool = False,
        client: Client = "",
    ) -> TokenInfo:
        """Revokes one token, or with `revoke_children` the subtree it minted, at once."""
        self._require_manage(caller)
        if not token_id:
            raise InvalidArgument([("id", "is required")])
        token = self._in_reach(caller, self.store.get_token(token_id, self.clock()))
        return self._revoke(token, revoke_children, _actor(caller, client))

    def _revoke(self, token: TokenInfo, revoke_children: bool, actor: Actor) -> TokenInfo:
        if token.revoked_at is not None and not revoke_children:
            return token
        entry = AuditEntry("token.revoke", token.org_id, actor, token.id,
                           {"revoke_children": revoke_children})
        children = AuditEntry("token.revoke", token.org_id, actor,
                              details={"revoked_with": token.id}) if revoke_children else None
        revoked = self.store.revoke(token.id, self.clock(), entry, children=children)
        if revoked is None:
            raise NotFound("no such token")
        log.info("token revoked", extra={"token_id": token.id, "children": revoke_children})
        return revoked

    def rotate_token(
        self, caller: Principal, token_id: str, grace_us: int, client: Client = ""
    ) -> RotatedToken:
        """A new token in the old one's place; the old one works for `grace_us` more."""
        self._require_manage(caller)
        violations: list[tuple[str, str]] = []
        if not token_id:
            violations.append(("id", "is required"))
        if not 0 <= grace_us <= MAX_GRACE_US:
            violations.append(("grace_period", "must be between 0 and 7 days"))
        if violations:
            raise InvalidArgument(violations)
        now = self.clock()
        old = self._in_reach(caller, self.store.get_token(token_id, now))
        self._require_rotatable(old)
        self._require_may_rotate(caller, old)
        actor = _actor(caller, client)
        old_expires = None if old.expires_at is None else to_micros(old.expires_at)
        grace_end = now + grace_us
        # The grace never lengthens a life: a token due to expire sooner still does.
        ends = grace_end if old_expires is None else min(old_expires, grace_end)
        for attempt in range(3):
            new_id = str(uuid.uuid4())
            raw, new = self._new_secret(
                name=old.name, scopes=old.scopes, expires_at=old_expires, created_at=now,
                user_id=old.user_id, org_id=old.org_id, parent_id=old.parent_id,
                rotated_from_id=old.id, rate_limit=old.rate_limit,
            )
            audit = [
                AuditEntry("token.rotate", old.org_id, actor, old.id, {
                    "replaced_by_id": new_id,
                    "grace_period_seconds": grace_us / 1e6,
                    "old_expires_at": None if grace_us == 0 else _iso(from_micros(ends)),
                }),
                AuditEntry("token.create", old.org_id, actor, new_id, {
                    "name": old.name, "scopes": list(old.scopes),
                    "expires_at": _iso(old.expires_at),
                    "rate_limit": _limit_details(old.rate_limit),
                    "parent_id": old.parent_id, "rotated_from_id": old.id,
                }),
            ]
            try:
                done = self.store.rotate(old.id, new_id, new, ends, grace_us == 0, now, audit)
            except Conflict:
                if attempt == 2:
                    raise
                continue
            if done is None:
                # Rotated, revoked or expired by someone else since we read it.
                fresh = self.store.get_token(old.id, self.clock())
                self._require_rotatable(fresh or old)
                raise FailedPrecondition("the token changed while rotating it; try again")
            info, previous = done
            return RotatedToken(raw=raw, info=info, previous=previous)
        raise AssertionError("unreachable")

    @staticmethod
    def _require_may_rotate(caller: Principal, token: TokenInfo) -> None:
        """Rotation hands the caller a working secret with the token's owner, scopes
        and expiry: Create's rules for the caller, as if it minted that token.

        Only the owner may rotate (api_token:admin lists and revokes the org's
        tokens; a secret of another user's would let an admin act as them), and
        a token can never get a token stronger than itself: every scope held by
        the caller, an expiry no later than the calling token's.
        """
        if token.user_id != caller.user_id:
            raise PermissionDenied(
                "only the token's owner can rotate it: rotation hands over a working secret"
            )
        if token.id == caller.token_id:
            return  # its own replacement is never stronger than itself
        missing = [scope for scope in token.scopes if scope not in caller.scopes]
        if missing:
            raise PermissionDenied(
                "the caller does not hold " + ", ".join(repr(s) for s in missing)
                + ", which the token has: a token can never get a token stronger than itself"
            )
        limit = caller.expires_at
        if limit is not None and (token.expires_at is None or token.expires_at > limit):
            raise PermissionDenied(
                f"the calling token expires at {_iso(limit)}, and the token would outlive it:"
                " a token can never get a token that outlives it"
            )

    @staticmethod
    def _require_rotatable(token: TokenInfo) -> None:
        if token.state is not TokenState.ACTIVE:
            raise FailedPrecondition(
                f"only an active token can be rotated; this one is {token.state.value.lower()}"
            )
        if token.replaced_by_id is not None:
            raise FailedPrecondition(
                f"this token was already rotated; rotate its replacement {token.replaced_by_id}"
            )

    def update_token(
        self,
        caller: Principal,
        token_id: str,
        changes: Mapping[str, Any],
        client: Client = "",
    ) -> TokenInfo:
        """Changes some of name, scopes, expires_at, rate_limit, each under Create's rules.

        `changes` maps each field of the update mask to its new value (None
        clears expires_at or rate_limit). Field paths in errors are the
        request's: `api_token.<field>`.
        """
        self._require_manage(caller)
        violations: list[tuple[str, str]] = []
        if not token_id:
            violations.append(("api_token.id", "is required"))
        if not changes:
            violations.append(("update_mask", "names no field to change"))
        for name in changes:
            if name not in UPDATABLE:
                violations.append((
                    "update_mask",
                    f"{shown(name)} cannot be changed; the fields that can are "
                    + ", ".join(sorted(UPDATABLE)),
                ))
        if violations:
            raise InvalidArgument(violations)
        now = self.clock()
        token = self._in_reach(caller, self.store.get_token(token_id, now))
        if token.state is TokenState.REVOKED:
            raise FailedPrecondition("a revoked token cannot be changed")
        if token.replaced_by_id is not None:
            raise FailedPrecondition(
                f"this token was rotated; change its replacement {token.replaced_by_id}"
            )
        values: dict[str, Any] = {}
        details: dict[str, Any] = {}
        clamp = None
        if "name" in changes:
            clean, why = validate_name(changes["name"] or "")
            if why:
                violations.append(("api_token.name", why))
            values["name"] = details["name"] = clean
        if "scopes" in changes:
            chosen = self._check_scopes(
                list(changes["scopes"] or ()), caller.scopes, violations, "api_token.scopes"
            )
            values["scopes"] = tuple(chosen)
            details["scopes"] = chosen
        if "expires_at" in changes:
            expires_at: datetime | None = changes["expires_at"]
            expires = None if expires_at is None else to_micros(expires_at)
            if expires is not None and expires <= now:
                violations.append(("api_token.expires_at", "must be in the future"))
            self._check_within_parent(
                expires, caller.expires_at, "the calling token", "api_token.expires_at",
                violations,
            )
            parent = None
            if token.parent_id and token.parent_id != caller.token_id:
                parent = self.store.get_token(token.parent_id, now)
            if parent is not None:
                self._check_within_parent(
                    expires, parent.expires_at, "its parent token", "api_token.expires_at",
                    violations,
                )
            values["expires_at"] = expires
            details["expires_at"] = _iso(expires_at)
            old = None if token.expires_at is None else to_micros(token.expires_at)
            if expires is not None and (old is None or expires < old):
                clamp = expires  # no child may outlive the shorter life
        if "rate_limit" in changes:
            limit: RateLimit | None = changes["rate_limit"]
            self._check_rate_limit(limit, "api_token.rate_limit", violations)
            values["rate_limit"] = limit
            details["rate_limit"] = _limit_details(limit)
        if violations:
            raise InvalidArgument(violations)
        entry = AuditEntry("token.update", token.org_id, _actor(caller, client), token.id,
                           details)
        updated = self.store.update_token(token.id, values, now, entry, clamp_children_to=clamp)
        if updated is None:
            raise FailedPrecondition("a revoked token cannot be changed")
        return updated

    # The audit log.

    def list_audit_events(
        self,
        caller: Principal,
        page_size: int,
        page_token: str,
        token_id: str = "",
        action: str = "",
    ) -> AuditPage:
        """The caller's org's events, newest first; needs api_token:admin."""
        if ADMIN not in caller.scopes:
            raise PermissionDenied(f"this call needs the scope {ADMIN}")
        size = self._page_size(page_size)
        violations: list[tuple[str, str]] = []
        if token_id:
            try:
                token_id = str(uuid.UUID(token_id))
            except ValueError:
                violations.append(("token_id", "is not a token id"))
        if action and action not in AUDIT_ACTIONS:
            violations.append(("action", "must be one of " + ", ".join(AUDIT_ACTIONS)))
        if violations:
            raise InvalidArgument(violations)
        filters = f"audit|{token_id}|{action}"
        after = decode_page_token(page_token, filters) if page_token else None
        rows = self.store.list_audit_events(
            org_id=caller.org_id, after=after, limit=size + 1, token_id=token_id, action=action
        )
        page = rows[:size]
        next_token = ""
        if len(rows) > size:
            last = page[-1]
            next_token = encode_page_token(Cursor(to_micros(last.time), last.id), filters)
        return AuditPage(tuple(page), next_token)

    def prune_audit(self, retention_days: int, batch: int = 500) -> int:
        """Deletes one batch of events older than the retention; returns how many."""
        return self.store.prune_audit(self.clock() - retention_days * DAY_MICROS, batch)

    # Leaked tokens.

    def report_leaked_tokens(
        self, raw_tokens: Sequence[str], source: str, client: Client = ""
    ) -> list[LeakResult]:
        """Revokes every reported token that verifies, with its subtree.

        A look-alike is dropped by its checksum before any database read; a
        token that fails to verify counts against the client like a failed
        Authenticate, and a throttled client is refused as there.
        """
        violations: list[tuple[str, str]] = []
        if not raw_tokens:
            violations.append(("tokens", "at least one token is required"))
        if len(raw_tokens) > MAX_LEAK_REPORT:
            violations.append(("tokens", f"at most {MAX_LEAK_REPORT} tokens a call"))
        if len(source) > MAX_SOURCE_LENGTH:
            violations.append(("source", f"must be at most {MAX_SOURCE_LENGTH} characters"))
        elif any(unicodedata.category(ch) == "Cc" for ch in source):
            violations.append(("source", "must not contain control characters"))
        if violations:
            raise InvalidArgument(violations)
        address = _client(client)
        wait = self.client_failures.retry_after(address)
        if wait > 0:
            raise _throttled(wait)
        actor = Actor(client_address=address)
        results = []
        for raw in raw_tokens:
            prefix = tokens.display_prefix(raw)
            parsed = tokens.parse(raw, self.config.token_prefix)
            if parsed is None:  # the checksum: no database read for a look-alike
                results.append(LeakResult(prefix, False))
                continue
            row = self.store.find_for_auth(parsed.lookup_id)
            if row is None:
                self._client_failed(client_keys(address))
                results.append(LeakResult(prefix, False))
                continue
            digest = self.verified.digest(parsed.lookup_id, parsed.secret)
            if not self.verified.is_verified(digest, row.secret_hash):
                claimant = self._may_try_secret(address, parsed.lookup_id, row.org_id)
                if not self.hasher.verify(parsed.secret, row.secret_hash, claimant):
                    self._client_failed(client_keys(address))
                    self.lookup_failures.fail(parsed.lookup_id)
                    results.append(LeakResult(prefix, False))
                    continue
                self.verified.add(digest, row.secret_hash)
            self._revoke_leaked(row, source, actor)
            results.append(LeakResult(prefix, True))
        return results

    def _revoke_leaked(self, row: AuthRow, source: str, actor: Actor) -> None:
        now = self.clock()
        if row.revoked_at is not None and not self._first_leak_report(row.token_id, now):
            # Reported again within the minute: the owner already has an event
            # saying where it was found; a reporter repeating it (or naming new
            # places) gets no write, so it cannot flood the audit log.
            return
        entry = AuditEntry("token.leak_reported", row.org_id, actor, row.token_id,
                           {"source": source})
        children = AuditEntry("token.revoke", row.org_id, actor,
                              details={"revoked_with": row.token_id, "reason": "leak_reported"})
        self.store.revoke(row.token_id, now, entry, children=children)
        if row.revoked_at is not None:
            # Revoked before: nothing changed, but the owner learns where it was found.
            self.store.append_audit([entry], now)
        log.warning("leaked token revoked", extra={"token_id": row.token_id})

    def _first_leak_report(self, token_id: str, now: int) -> bool:
        """Whether a revoked token's leak report is the first in REUSE_REPORT_EVERY_US
        here (per process: each replica records at most one a minute)."""
        with self._reuse_lock:
            seen = self._leaks_seen.get(token_id)
            if seen is not None and now - seen < REUSE_REPORT_EVERY_US:
                return False
            self._leaks_seen[token_id] = now
            self._leaks_seen.move_to_end(token_id)
            while len(self._leaks_seen) > 10_000:
                self._leaks_seen.popitem(last=False)
        return True

    # Consumers that cache Authenticate's answers (WatchTokenEvents).

    def require_verify(self, caller: Principal) -> None:
        """Watching token events needs api_token:verify: the events name tokens of every org."""
        if VERIFY not in caller.scopes:
            raise PermissionDenied(f"this call needs the scope {VERIFY}")

    async def arecord_cached_uses(self, uses: Sequence[CachedUse]) -> None:
        """Uses a consumer answered from its cache count as Authenticate calls do.

        last_used_at moves to the reported time (never past now), and each use
        is charged against the token's rate limit (ratelimit.window_charge: never
        refused, it happened). The consumer answered them within the budget
        slice its last Authenticate granted (RateLimitStatus.cache_budget), so
        the next Authenticate past that slice finds them counted. Entries
        naming no token id, no token that exists, or no use, are dropped: made-up
        ids reach neither the last_used_at writes nor the kept limits. The
        charge reads the tokens' limits and may wait on Redis: it runs on
        `blocking`.
        """
        if len(uses) > MAX_USES_PER_REPORT:
            raise InvalidArgument([("uses", f"at most {MAX_USES_PER_REPORT} per report")])
        now = self.clock()
        counts: dict[str, int] = {}
        last: dict[str, int] = {}
        for use in uses:
            try:
                token_id = str(uuid.UUID(use.token_id))
            except ValueError:
                continue
            if use.count <= 0:
                continue
            last[token_id] = max(last.get(token_id, 0), min(use.last_used_at, now))
            counts[token_id] = counts.get(token_id, 0) + use.count
        if counts:
            await asyncio.get_running_loop().run_in_executor(
                self.blocking, contextvars.copy_context().run, self._charge_cached, counts, last
            )

    def _charge_cached(self, counts: Mapping[str, int], last: Mapping[str, int]) -> None:
        try:
            limits = self._reported_limits(list(counts))
        except Unavailable:
            # Limits fail open, never authentication: the report's stream
            # stays up, and these uses go uncounted (the next report, a second
            # later, moves last_used_at).
            log.warning("usage report not charged: the token store is unavailable")
            return
        for token_id, count in counts.items():
            if token_id not in limits:
                continue  # no such token
            if self.usage is not None:
                self.usage.record(token_id, last[token_id])
            limit = limits[token_id]
            if limit is not None:
                self.limiter.charge(token_id, *limit, min(count, limit[0]))

    def _reported_limits(self, token_ids: Sequence[str]) -> dict[str, tuple[int, float] | None]:
        """Each existing token's (requests, period in seconds) for charging reports;
        None: no limit. A token that does not exist is left out.

        Kept for REPORT_LIMIT_SECONDS, so a busy consumer's reports cost no
        read each; the tokens not kept are read in one query. A changed limit
        reaches the charges that long after. Ids that name no token are not
        kept: made-up ids would push out the real ones.
        """
        now = self.clock()
        found: dict[str, tuple[int, float] | None] = {}
        with self._report_limits_lock:
            for token_id in token_ids:
                known = self._report_limits.get(token_id)
                if known is not None and now - known[1] < REPORT_LIMIT_SECONDS * 1_000_000:
                    found[token_id] = known[0]
        missing = [t for t in token_ids if t not in found]
        if not missing:
            return found
        with self.auth_store.connection():
            own = self.auth_store.rate_limits(missing)
        default = self.config.rate_limit
        for token_id in missing:
            if token_id not in own:
                continue  # no such token
            requests, period_us = own[token_id]
            if requests is not None and period_us is not None:
                found[token_id] = (requests, period_us / 1_000_000)
            else:
                found[token_id] = None if default is None else (default.requests, default.period_s)
        with self._report_limits_lock:
            for token_id in missing:
                if token_id not in found:
                    continue
                self._report_limits[token_id] = (found[token_id], now)
                self._report_limits.move_to_end(token_id)
            while len(self._report_limits) > REPORT_LIMITS_KEPT:
                self._report_limits.popitem(last=False)
        return found

    # Users, for the command line (actor "cli").

    def add_user(self, email: str, org_id: str, permissions: Sequence[str]) -> None:
        violations: list[tuple[str, str]] = []
        email = email.strip().lower()
        if "@" not in email or len(email) > 320 or any(c.isspace() for c in email):
            violations.append(("email", "must be an email address"))
        if not org_id.strip():
            violations.append(("org", "is required"))
        chosen = self._check_permissions(permissions, violations)
        if violations:
            raise InvalidArgument(violations)
        audit = AuditEntry("user.add", org_id.strip(), CLI_ACTOR,
                           details={"email": email, "permissions": chosen})
        try:
            self.store.add_user(email, org_id.strip(), chosen, self.clock(), audit)
        except Conflict:
            raise AlreadyExists(f"a user with email {email} already exists") from None

    def _check_permissions(
        self, permissions: Sequence[str], violations: list[tuple[str, str]]
    ) -> list[str]:
        chosen: list[str] = []
        for p in permissions:
            why = why_not_canonical(p)
            scope = None if why else self.catalog.get(p)
            if why:
                violations.append(("permissions", f"{shown(p)} {why}, so it is no scope name"))
            elif scope is None:
                violations.append(("permissions", f"{shown(p)} is not a known scope"))
            elif scope.name not in chosen:
                chosen.append(scope.name)
        return chosen

    def _user(self, email: str) -> UserInfo:
        user = self.store.find_user(email.strip().lower())
        if user is None:
            raise NotFound(f"no user with email {email.strip().lower()}")
        return user

    def disable_user(self, email: str) -> None:
        self._set_disabled(email, True)

    def enable_user(self, email: str) -> None:
        self._set_disabled(email, False)

    def _set_disabled(self, email: str, disabled: bool) -> None:
        user = self._user(email)
        audit = AuditEntry("user.disable" if disabled else "user.enable", user.org_id,
                           CLI_ACTOR, details={"email": user.email})
        self.store.set_user_disabled(user.email, disabled, self.clock(), audit)

    def set_permissions(self, email: str, permissions: Sequence[str]) -> UserInfo:
        """Replaces a user's permissions; a narrowed one narrows every token at its next use."""
        violations: list[tuple[str, str]] = []
        chosen = self._check_permissions(permissions, violations)
        if not permissions:
            violations.append(("permissions", "at least one permission is required"))
        if violations:
            raise InvalidArgument(violations)
        user = self._user(email)
        audit = AuditEntry("user.update", user.org_id, CLI_ACTOR, details={
            "email": user.email,
            "permissions": chosen,
            "removed": [p for p in user.permissions if p not in chosen],
            "added": [p for p in chosen if p not in user.permissions],
        })
        self.store.set_user_permissions(user.email, chosen, self.clock(), audit)
        return self._user(email)

    def list_users(self, org_id: str | None = None) -> list[UserInfo]:
        return self.store.list_users(org_id.strip() if org_id else None)

    def tokens_for_email(self, email: str) -> list[TokenInfo]:
        return self.store.tokens_of_user(self._user(email).id, self.clock())

    def revoke_by_id(self, token_id: str, revoke_children: bool = False) -> TokenInfo:
        """The command line's revoke: any token, by id, as "cli"."""
        token = self.store.get_token(token_id.strip(), self.clock())
        if token is None:
            raise NotFound(f"no token with id {token_id.strip()}")
        return self._revoke(token, revoke_children, CLI_ACTOR)

    def audit_events(self, org_id: str | None, token_id: str, limit: int) -> list[AuditEvent]:
        """The newest `limit` events, of one org or all (the command line's `audit`)."""
        if limit <= 0:
            raise InvalidArgument([("limit", "must be more than zero")])
        token_id = token_id.strip()
        if token_id:
            try:
                token_id = str(uuid.UUID(token_id))
            except ValueError:
                raise InvalidArgument([("token_id", "is not a token id")]) from None
        return self.store.list_audit_events(
            org_id=org_id, after=None, limit=limit, token_id=token_id
        )

    def mint_for_email(
        self, email: str, name: str, scopes: Sequence[str], expires_at: datetime | None
    ) -> CreatedToken:
        """The command line's bootstrap path: the user's permissions are what may be granted."""
        user = self._user(email)
        if user.disabled:
            raise PermissionDenied(f"user {user.email} is disabled")
        return self.mint(user.id, user.org_id, user.permissions, name, scopes, expires_at)
