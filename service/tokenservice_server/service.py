"""The rules of tokenservice: plain functions of plain values, no grpc, protobuf or peewee."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import logging
import time
import unicodedata
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime

from . import tokens
from .config import Config
from .crypto import SecretHasher, VerifiedCache
from .errors import (
    AUTH_FAILED,
    AlreadyExists,
    Conflict,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
)
from .scopes import ADMIN, MANAGE, VERIFY, ScopeCatalog, normalise
from .store import Store
from .throttle import FailureBuckets
from .usage import UsageRecorder
from .values import (
    AuthRow,
    CachedUse,
    CreatedToken,
    Cursor,
    NewToken,
    Principal,
    TokenInfo,
    TokenPage,
    from_micros,
    to_micros,
)

log = logging.getLogger("tokenservice.service")

DEFAULT_PAGE_SIZE = 50
MAX_USES_PER_REPORT = 10_000
MAX_PAGE_SIZE = 1000
MAX_NAME_LENGTH = 200
BIDI_FORMATTING = frozenset(
    chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))
)
# A client address, or a function giving it: only the failure paths need it,
# so the gRPC layer passes it lazily.
Client = str | Callable[[], str]


def _throttled(wait: float) -> RateLimited:
    """Refusal of a client address that keeps failing: the gRPC layer may tarpit it."""
    error = RateLimited("too many failed authentications, slow down", wait)
    error.client_throttled = True
    return error


def now_micros() -> int:
    return time.time_ns() // 1000


@dataclass(frozen=True, slots=True)
class _PendingCheck:
    """A token found, its secret not yet verified: one hash check is owed."""

    lookup_id: str
    secret: str
    row: AuthRow
    digest: bytes


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


def encode_page_token(cursor: Cursor) -> str:
    raw = f"1:{cursor.created_at}:{uuid.UUID(cursor.id).hex}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(page_token: str) -> Cursor:
    bad = InvalidArgument([("page_token", "is not a page token this service issued")])
    try:
        padded = page_token + "=" * (-len(page_token) % 4)
        version, created, token_hex = (
            base64.urlsafe_b64decode(padded.encode("ascii")).decode("ascii").split(":")
        )
        if version != "1":
            raise bad
        return Cursor(int(created), str(uuid.UUID(hex=token_hex)))
    except (ValueError, UnicodeError, binascii.Error):
        raise bad from None


class TokenService:
    """Create, list, get, revoke and authenticate, over a Store and a SecretHasher.

    The synchronous methods run inside a connection their caller holds
    (`store.connection()`: one per RPC, or per command); `aauthenticate` manages
    its own, because it decides itself what runs on the event loop.
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
    ) -> None:
        self.config = config
        self.store = store
        self.catalog = catalog
        self.hasher = hasher
        self.usage = usage
        self.clock = clock
        # Where aauthenticate runs a store read that may not block the loop.
        self.blocking = blocking
        self.verified = VerifiedCache(config.verified_cache_size)
        self.client_failures = FailureBuckets(
            config.auth_failure_burst, config.auth_failure_refill_per_second
        )
        self.lookup_failures = FailureBuckets(
            config.lookup_failure_burst, config.lookup_failure_refill_per_second
        )
        # Called with each use a consumer answered from its cache: where the
        # per-token rate limiter charges them (cost=count), as Authenticate
        # charges its own calls.
        self.cached_use_hook: Callable[[CachedUse], None] | None = None

    def close(self) -> None:
        self.hasher.close()

    # Authenticate: the hot path.

    def authenticate(self, raw_token: str, client: Client = "") -> Principal:
        """Verifies a raw token. Every failure raises Unauthenticated(AUTH_FAILED).

        Cost: a checksum, one indexed read of token and user, and either a
        cache hit or exactly one hash check. Revocation, expiry and the user's
        state come from that read, so they hold on every call.
        """
        step = self._begin(raw_token, client)
        if isinstance(step, _PendingCheck):
            ok = self.hasher.verify(step.secret, step.row.secret_hash)
            return self._finish(step, ok, client)
        return step

    async def aauthenticate(self, raw_token: str, client: Client = "") -> Principal:
        """authenticate() for an event loop.

        The one read runs on the loop's thread when the store answers it from
        memory (SQLite), else on `blocking`; the hash check runs on the
        hasher's threads. No connection is held across an await: peewee's
        connection state is per thread, and other calls run on the loop meanwhile.
        """

        def read() -> Principal | _PendingCheck:
            with self.store.connection():
                return self._begin(raw_token, client)

        if self.store.inline_reads:
            step = read()
        else:
            step = await asyncio.get_running_loop().run_in_executor(
                self.blocking, contextvars.copy_context().run, read
            )
        if isinstance(step, _PendingCheck):
            ok = await self.hasher.averify(step.secret, step.row.secret_hash)
            return self._finish(step, ok, client)
        return step

    def _begin(self, raw_token: str, client: Client) -> Principal | _PendingCheck:
        """The store part: a Principal, or the hash check still owed."""
        parsed = tokens.parse(raw_token, self.config.token_prefix)
        row = self.store.find_for_auth(parsed.lookup_id) if parsed else None
        if parsed is None or row is None:
            self._fail(client, None)
        digest = self.verified.digest(parsed.lookup_id, parsed.secret)
        if not self.verified.is_verified(digest, row.secret_hash):
            self._may_try_secret(client, parsed.lookup_id)
            return _PendingCheck(parsed.lookup_id, parsed.secret, row, digest)
        return self._grant(row)

    def _finish(self, step: _PendingCheck, ok: bool, client: Client) -> Principal:
        """After the hash check: no store access."""
        if not ok:
            self._fail(client, step.lookup_id)
        self.verified.add(step.digest, step.row.secret_hash)
        return self._grant(step.row)

    def _grant(self, row: AuthRow) -> Principal:
        now = self.clock()
        # The secret was right, so none of these is guessing: nothing to throttle.
        if row.revoked_at is not None:
            raise Unauthenticated(AUTH_FAILED, "revoked")
        if row.expires_at is not None and row.expires_at <= now:
            raise Unauthenticated(AUTH_FAILED, "expired")
        if row.disabled:
            raise Unauthenticated(AUTH_FAILED, "disabled")
        if self.usage is not None:
            self.usage.record(row.token_id, now)
        permissions = set(row.permissions)
        return Principal(
            token_id=row.token_id,
            user_id=row.user_id,
            email=row.email,
            org_id=row.org_id,
            scopes=tuple(s for s in row.scopes if s in permissions),
            expires_at=None if row.expires_at is None else from_micros(row.expires_at),
        )

    def _fail(self, client: Client, lookup_id: str | None) -> None:
        client = client() if callable(client) else client
        wait = self.client_failures.retry_after(client)
        if wait > 0 and lookup_id is None:
            raise _throttled(wait)
        self.client_failures.fail(client)
        if lookup_id is not None:
            self.lookup_failures.fail(lookup_id)
        raise Unauthenticated(AUTH_FAILED)

    def _may_try_secret(self, client: Client, lookup_id: str) -> None:
        """Refuses a hash check to a token being guessed at, or to a throttled client
        guessing at a token that has failed before. A token's first check from any
        client goes ahead, so a flood never locks a good token out."""
        wait = self.lookup_failures.retry_after(lookup_id)
        if wait > 0:
            raise RateLimited("too many failed authentications, slow down", wait)
        if not self.lookup_failures.untouched(lookup_id):
            wait = self.client_failures.retry_after(client() if callable(client) else client)
            if wait > 0:
                raise _throttled(wait)

    def tarpitted(self, client: Client, seconds: float) -> None:
        """A throttled client was kept waiting: its wait does not refill its bucket."""
        self.client_failures.hold(client() if callable(client) else client, seconds)

    # Management: the caller is a Principal from authenticate().

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
    ) -> CreatedToken:
        self._require_manage(caller)
        return self.mint(caller.user_id, caller.org_id, caller.scopes, name, scopes, expires_at)

    def mint(
        self,
        user_id: str,
        org_id: str,
        held: Sequence[str],
        name: str,
        scopes: Sequence[str],
        expires_at: datetime | None,
    ) -> CreatedToken:
        """Creates a token under the create rules; `held` is what the caller may grant."""
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
        if violations:
            raise InvalidArgument(violations)
        for attempt in range(3):
            raw, parts = tokens.new_token(self.config.token_prefix)
            new = NewToken(
                lookup_id=parts.lookup_id,
                token_prefix=tokens.display_prefix(raw),
                secret_hash=self.hasher.hash(parts.secret),
                name=clean_name or "",
                scopes=tuple(chosen),
                expires_at=expires,
                created_at=now,
                user_id=user_id,
                org_id=org_id,
            )
            try:
                return CreatedToken(raw=raw, info=self.store.insert_token(new))
            except Conflict:
                # A lookup id collision (about 2**-71): draw another.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _check_scopes(
        self, scopes: Sequence[str], held: Sequence[str], violations: list[tuple[str, str]]
    ) -> list[str]:
        if not scopes:
            violations.append(("scopes", "at least one scope is required"))
            return []
        held_set = {normalise(s) for s in held}
        chosen: list[str] = []
        seen: set[str] = set()
        for requested in scopes:
            scope = self.catalog.get(requested)
            key = normalise(requested)
            if scope is None:
                violations.append(("scopes", f"{requested!r} is not a known scope"))
            elif key in seen:
                violations.append(("scopes", f"{scope.name!r} is listed more than once"))
            elif key not in held_set:
                violations.append(
                    ("scopes", f"{scope.name!r} is not held by the caller, so it cannot be granted")
                )
            else:
                chosen.append(scope.name)
            seen.add(key)
        return chosen

    def list_tokens(self, caller: Principal, page_size: int, page_token: str) -> TokenPage:
        self._require_manage(caller)
        if page_size < 0:
            raise InvalidArgument([("page_size", "must not be negative")])
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = decode_page_token(page_token) if page_token else None
        rows = self.store.list_tokens(
            org_id=caller.org_id,
            user_id=None if ADMIN in caller.scopes else caller.user_id,
            after=after,
            limit=size + 1,
        )
        page = rows[:size]
        next_token = ""
        if len(rows) > size:
            last = page[-1]
            next_token = encode_page_token(Cursor(to_micros(last.created_at), last.id))
        return TokenPage(tuple(page), next_token)

    def get_token(self, caller: Principal, token_id: str) -> TokenInfo:
        self._require_manage(caller)
        if not token_id:
            raise InvalidArgument([("id", "is required")])
        return self._in_reach(caller, self.store.get_token(token_id))

    def revoke_token(self, caller: Principal, token_id: str) -> TokenInfo:
        self._require_manage(caller)
        if not token_id:
            raise InvalidArgument([("id", "is required")])
        token = self._in_reach(caller, self.store.get_token(token_id))
        if token.revoked_at is None:
            token = self._in_reach(caller, self.store.revoke(token.id, self.clock()))
            log.info("token revoked", extra={"token_id": token.id})
        return token

    # Consumers that cache Authenticate's answers (WatchTokenEvents).

    def require_verify(self, caller: Principal) -> None:
        """Watching token events needs api_token:verify: the events name tokens of every org."""
        if VERIFY not in caller.scopes:
            raise PermissionDenied(f"this call needs the scope {VERIFY}")

    def record_cached_uses(self, uses: Sequence[CachedUse]) -> None:
        """Uses a consumer answered from its cache count as Authenticate calls do.

        last_used_at moves to the reported time (never past now); the
        cached-use hook sees each use. Entries naming no token id are dropped.
        """
        if len(uses) > MAX_USES_PER_REPORT:
            raise InvalidArgument([("uses", f"at most {MAX_USES_PER_REPORT} per report")])
        now = self.clock()
        for use in uses:
            try:
                token_id = str(uuid.UUID(use.token_id))
            except ValueError:
                continue
            if use.count <= 0:
                continue
            if self.usage is not None:
                self.usage.record(token_id, min(use.last_used_at, now))
            if self.cached_use_hook is not None:
                self.cached_use_hook(use)

    # Users, for the command line.

    def add_user(self, email: str, org_id: str, permissions: Sequence[str]) -> None:
        violations: list[tuple[str, str]] = []
        email = email.strip().lower()
        if "@" not in email or len(email) > 320 or any(c.isspace() for c in email):
            violations.append(("email", "must be an email address"))
        if not org_id.strip():
            violations.append(("org", "is required"))
        chosen: list[str] = []
        for p in permissions:
            scope = self.catalog.get(p)
            if scope is None:
                violations.append(("permissions", f"{p!r} is not a known scope"))
            elif scope.name not in chosen:
                chosen.append(scope.name)
        if violations:
            raise InvalidArgument(violations)
        try:
            self.store.add_user(email, org_id.strip(), chosen, self.clock())
        except Conflict:
            raise AlreadyExists(f"a user with email {email} already exists") from None

    def disable_user(self, email: str) -> None:
        if not self.store.set_user_disabled(email.strip().lower(), True):
            raise NotFound(f"no user with email {email.strip().lower()}")

    def mint_for_email(
        self, email: str, name: str, scopes: Sequence[str], expires_at: datetime | None
    ) -> CreatedToken:
        """The command line's bootstrap path: the user's permissions are what may be granted."""
        user = self.store.find_user(email.strip().lower())
        if user is None:
            raise NotFound(f"no user with email {email.strip().lower()}")
        if user.disabled:
            raise PermissionDenied(f"user {user.email} is disabled")
        return self.mint(user.id, user.org_id, user.permissions, name, scopes, expires_at)
