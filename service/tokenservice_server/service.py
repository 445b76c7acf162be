"""The rules of tokenservice, as plain functions of plain values: no grpc, no protobuf."""

from __future__ import annotations

import base64
import binascii
import logging
import time
import unicodedata
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import peewee

from . import tokens
from .config import Config
from .crypto import BcryptPool, VerifiedCache, hash_secret
from .errors import (
    AUTH_FAILED,
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
)
from .models import ApiToken, from_micros, to_micros
from .scopes import ADMIN, MANAGE, ScopeCatalog, normalise
from .store import Store
from .throttle import FailureBuckets
from .usage import UsageRecorder

log = logging.getLogger("tokenservice.service")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_NAME_LENGTH = 200
BIDI_FORMATTING = frozenset(
    chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))
)


def _throttled(wait: float) -> RateLimited:
    """Refusal of a client address that keeps failing: the gRPC layer may tarpit it."""
    error = RateLimited("too many failed authentications, slow down", wait)
    error.client_throttled = True
    return error


def now_micros() -> int:
    return time.time_ns() // 1000


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a valid token belongs to and what it may do right now."""

    token_id: str
    user_id: str
    email: str
    org_id: str
    scopes: tuple[str, ...]  # token scopes ∩ the user's current permissions
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class PendingCheck:
    """A token found, its secret not yet verified: one bcrypt check is owed."""

    lookup_id: str
    secret: str
    row: Any
    digest: bytes


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A token's metadata as callers see it; never the raw token."""

    id: str
    name: str
    token_prefix: str
    scopes: tuple[str, ...]
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime
    created_by_email: str
    org_id: str


@dataclass(frozen=True, slots=True)
class CreatedToken:
    raw: str  # shown once, here only
    info: TokenInfo


@dataclass(frozen=True, slots=True)
class TokenPage:
    tokens: tuple[TokenInfo, ...]
    next_page_token: str


def _info(token: ApiToken, last_used_override: int | None = None) -> TokenInfo:
    last_used = token.last_used_at
    if last_used_override is not None:
        candidate = from_micros(last_used_override)
        if last_used is None or candidate > last_used:
            last_used = candidate
    return TokenInfo(
        id=str(token.id),
        name=token.name,
        token_prefix=token.token_prefix,
        scopes=tuple(token.scopes),
        expires_at=token.expires_at,
        last_used_at=last_used,
        revoked_at=token.revoked_at,
        created_at=token.created_at,
        created_by_email=token.user.email,
        org_id=token.org_id,
    )


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


def encode_page_token(created_at: int, token_id: str) -> str:
    raw = f"1:{created_at}:{uuid.UUID(token_id).hex}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(page_token: str) -> tuple[int, str]:
    bad = InvalidArgument([("page_token", "is not a page token this service issued")])
    try:
        padded = page_token + "=" * (-len(page_token) % 4)
        version, created, token_hex = (
            base64.urlsafe_b64decode(padded.encode("ascii")).decode("ascii").split(":")
        )
        if version != "1":
            raise bad
        return int(created), str(uuid.UUID(hex=token_hex))
    except (ValueError, UnicodeError, binascii.Error):
        raise bad from None


class TokenService:
    """Create, list, get, revoke and authenticate, over a Store."""

    def __init__(
        self,
        config: Config,
        store: Store,
        catalog: ScopeCatalog,
        usage: UsageRecorder | None = None,
        clock: Callable[[], int] = now_micros,
    ) -> None:
        self.config = config
        self.store = store
        self.catalog = catalog
        self.usage = usage
        self.clock = clock
        self.verified = VerifiedCache(config.verified_cache_size)
        self.bcrypt = BcryptPool(config.bcrypt_concurrency, config.bcrypt_max_waiting)
        self.client_failures = FailureBuckets(
            config.auth_failure_burst, config.auth_failure_refill_per_second
        )
        self.lookup_failures = FailureBuckets(
            config.lookup_failure_burst, config.lookup_failure_refill_per_second
        )

    # Authenticate: the hot path.

    def authenticate(self, raw_token: str, client: str | Callable[[], str] = "") -> Principal:
        """Verifies a raw token. Every failure raises Unauthenticated(AUTH_FAILED).

        Cost: a checksum, one indexed read of token and user, and either a
        cache hit or exactly one bcrypt check. Revocation, expiry and the
        user's state come from that read, so they hold on every call.
        `client` (the caller's address) may be a callable: only the failure
        and throttling paths need it, so the gRPC layer passes it lazily.

        The same steps as begin_authenticate / finish_authenticate, which an
        event loop uses to run the bcrypt check on a thread of its own.
        """
        step = self.begin_authenticate(raw_token, client)
        if isinstance(step, PendingCheck):
            ok = self.bcrypt.check(step.secret, step.row.secret_hash)
            return self.finish_authenticate(step, ok, client)
        return step

    def begin_authenticate(
        self, raw_token: str, client: str | Callable[[], str] = ""
    ) -> Principal | PendingCheck:
        """The database part of authenticate(): a Principal, or the bcrypt check still owed."""
        parsed = tokens.parse(raw_token, self.config.token_prefix)
        row = self.store.find_for_auth(parsed.lookup_id) if parsed else None
        if parsed is None or row is None:
            self._fail(client, None)
        digest = self.verified.digest(parsed.lookup_id, parsed.secret)
        if not self.verified.is_verified(digest, row.secret_hash):
            self._may_try_secret(client, parsed.lookup_id)
            return PendingCheck(parsed.lookup_id, parsed.secret, row, digest)
        return self._grant(row)

    def finish_authenticate(
        self, step: PendingCheck, ok: bool, client: str | Callable[[], str] = ""
    ) -> Principal:
        """After the bcrypt check: no database access."""
        if not ok:
            self._fail(client, step.lookup_id)
        self.verified.add(step.digest, step.row.secret_hash)
        return self._grant(step.row)

    def _grant(self, row: Any) -> Principal:
        now = self.clock()
        if (
            row.revoked_at is not None
            or (row.expires_at is not None and row.expires_at <= now)
            or row.disabled
        ):
            # The secret was right, so this is no guessing: nothing to throttle.
            raise Unauthenticated(AUTH_FAILED)
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

    def _fail(self, client: str | Callable[[], str], lookup_id: str | None) -> None:
        client = client() if callable(client) else client
        wait = self.client_failures.retry_after(client)
        if wait > 0 and lookup_id is None:
            raise _throttled(wait)
        self.client_failures.fail(client)
        if lookup_id is not None:
            self.lookup_failures.fail(lookup_id)
        raise Unauthenticated(AUTH_FAILED)

    def _may_try_secret(self, client: str | Callable[[], str], lookup_id: str) -> None:
        """Refuses a bcrypt check to a token being guessed at, or to a throttled client
        guessing at a token that has failed before. A token's first check from any
        client goes ahead, so a flood never locks a good token out."""
        wait = self.lookup_failures.retry_after(lookup_id)
        if wait > 0:
            raise RateLimited("too many failed authentications, slow down", wait)
        if not self.lookup_failures.untouched(lookup_id):
            wait = self.client_failures.retry_after(client() if callable(client) else client)
            if wait > 0:
                raise _throttled(wait)

    def tarpitted(self, client: str | Callable[[], str], seconds: float) -> None:
        """A throttled client was kept waiting: its wait does not refill its bucket."""
        self.client_failures.hold(client() if callable(client) else client, seconds)

    # Management: the caller is a Principal from authenticate().

    def _require_manage(self, caller: Principal) -> None:
        if MANAGE not in caller.scopes:
            raise PermissionDenied(f"this call needs the scope {MANAGE}")

    def _in_reach(self, caller: Principal, token: ApiToken | None) -> ApiToken:
        if (
            token is None
            or token.org_id != caller.org_id
            or (str(token.user_id) != caller.user_id and ADMIN not in caller.scopes)
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
        """Creates a token under the rules of CreateToken; `held` is what the caller may grant."""
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
        raw, parts = tokens.new_token(self.config.token_prefix)
        secret_hash = hash_secret(parts.secret, self.config.bcrypt_rounds)
        for attempt in range(3):
            try:
                with self.store.db.atomic():
                    token = self.store.insert_token(
                        lookup_id=parts.lookup_id,
                        token_prefix=tokens.display_prefix(raw),
                        secret_hash=secret_hash,
                        name=clean_name or "",
                        scopes=chosen,
                        expires_at=expires,
                        created_at=now,
                        user_id=user_id,
                        org_id=org_id,
                    )
                break
            except peewee.IntegrityError:
                # A lookup id collision (about 2**-71): draw another.
                if attempt == 2:
                    raise
                raw, parts = tokens.new_token(self.config.token_prefix)
                secret_hash = hash_secret(parts.secret, self.config.bcrypt_rounds)
        return CreatedToken(raw=raw, info=_info(token))

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
            next_token = encode_page_token(to_micros(last.created_at), str(last.id))
        return TokenPage(tuple(_info(t) for t in page), next_token)

    def get_token(self, caller: Principal, token_id: str) -> TokenInfo:
        self._require_manage(caller)
        if not token_id:
            raise InvalidArgument([("id", "is required")])
        return _info(self._in_reach(caller, self.store.get_token(token_id)))

    def revoke_token(self, caller: Principal, token_id: str) -> TokenInfo:
        self._require_manage(caller)
        if not token_id:
            raise InvalidArgument([("id", "is required")])
        token = self._in_reach(caller, self.store.get_token(token_id))
        if token.revoked_at is None:
            self.store.revoke(str(token.id), self.clock())
            token = self.store.get_token(str(token.id))
        log.info("token revoked", extra={"token_id": str(token.id)})
        return _info(token)

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
            with self.store.db.atomic():
                self.store.add_user(email, org_id.strip(), chosen, self.clock())
        except peewee.IntegrityError:
            raise AlreadyExists(f"a user with email {email} already exists") from None

    def disable_user(self, email: str) -> None:
        if self.store.set_user_disabled(email.strip().lower(), True) == 0:
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
        return self.mint(str(user.id), user.org_id, user.permissions, name, scopes, expires_at)
