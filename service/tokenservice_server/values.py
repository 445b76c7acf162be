"""Plain values the store returns and the rules work on: no peewee, no grpc, no protobuf."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

DAY_MICROS = 86_400_000_000
# The fields of a token that UpdateToken may change.
UPDATABLE = frozenset({"name", "scopes", "expires_at", "rate_limit"})


def to_micros(value: datetime) -> int:
    if value.tzinfo is None:
        raise ValueError("naive datetime")
    delta = value - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(value: int) -> datetime:
    return datetime.fromtimestamp(value // 1_000_000, UTC).replace(microsecond=value % 1_000_000)


@dataclass(frozen=True, slots=True)
class RateLimitStatus:
    """A token's standing against its rate limit after a call it was allowed."""

    limit: int  # calls per period
    remaining: int  # calls left in the window after this one (ratelimit.Decision)
    # When the token is fully rested, in UTC microseconds: built on every call, so
    # no datetime on the way.
    reset_at_us: int
    # The uses a caching consumer that asked may answer from memory before
    # asking again (ratelimit.py: promised, then counted when reported).
    cache_budget: int = 0


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a valid token belongs to and what it may do right now."""

    token_id: str
    user_id: str
    email: str
    org_id: str
    scopes: tuple[str, ...]  # token scopes ∩ the user's current permissions
    expires_at: datetime | None
    # Set by Authenticate for a token with a limit; None when it has none.
    rate_limit: RateLimitStatus | None = None


@dataclass(frozen=True, slots=True)
class AuthRow:
    """What Authenticate needs of a token and its user, read in one indexed query.

    Times are integer UTC microseconds, as stored: the hot path compares them
    without building datetimes.
    """

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
    # Set once the token was rotated: its secret presented after the grace is
    # a reuse worth recording.
    replaced_by_id: str | None = None
    # The token's own rate limit (both set, or neither: the service default).
    rate_limit_requests: int | None = None
    rate_limit_period_us: int | None = None


class TokenState(enum.Enum):
    """Where a token stands; computed when it is read, never stored."""

    ACTIVE = "ACTIVE"
    EXPIRED = "EXPIRED"
    REVOKED = "REVOKED"


def token_state(revoked_at: int | None, expires_at: int | None, now: int) -> TokenState:
    """The state of a token with these times (micros) at `now`."""
    if revoked_at is not None:
        return TokenState.REVOKED
    if expires_at is not None and expires_at <= now:
        return TokenState.EXPIRED
    return TokenState.ACTIVE


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token's own budget: `requests` calls per `period_us` microseconds."""

    requests: int
    period_us: int


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A token's metadata as callers see it; never the raw token or its hash."""

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
    user_id: str
    state: TokenState
    parent_id: str | None = None
    rotated_from_id: str | None = None
    replaced_by_id: str | None = None
    rate_limit: RateLimit | None = None


@dataclass(frozen=True, slots=True)
class NewToken:
    """A token about to be stored: everything but its id, which the store assigns."""

    lookup_id: str
    token_prefix: str
    secret_hash: str
    name: str
    scopes: tuple[str, ...]
    expires_at: int | None
    created_at: int
    user_id: str
    org_id: str
    parent_id: str | None = None
    rotated_from_id: str | None = None
    rate_limit: RateLimit | None = None


@dataclass(frozen=True, slots=True)
class UserInfo:
    id: str
    email: str
    org_id: str
    permissions: tuple[str, ...]
    disabled: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class CreatedToken:
    raw: str  # shown once, here only
    info: TokenInfo


@dataclass(frozen=True, slots=True)
class RotatedToken:
    raw: str  # the new token's secret, shown once, here only
    info: TokenInfo  # the new token
    previous: TokenInfo  # the old one, as rotation left it


@dataclass(frozen=True, slots=True)
class LeakResult:
    token_prefix: str
    revoked: bool


@dataclass(frozen=True, slots=True)
class Actor:
    """Who made a change: a user through a token, the command line, or nobody known."""

    user_id: str = ""
    email: str = ""
    token_id: str = ""
    client_address: str = ""
    # The subject of the client certificate the caller presented (mTLS), if any.
    client_subject: str = ""


# The command line acts with direct access to the store, as no user.
CLI_ACTOR = Actor(email="cli")


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """An audit event about to be written with the change it records."""

    action: str
    org_id: str
    actor: Actor
    token_id: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """An audit event as stored: never a raw token or a secret."""

    id: str
    time: datetime
    action: str
    org_id: str
    actor_user_id: str
    actor_email: str
    actor_token_id: str
    token_id: str
    client_address: str
    details: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AuditPage:
    events: tuple[AuditEvent, ...]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page ends in the newest-first order: (created_at micros, token id)."""

    created_at: int
    id: str


@dataclass(frozen=True, slots=True)
class TokenPage:
    tokens: tuple[TokenInfo, ...]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class Narrowed:
    """A committed change that narrowed tokens: consumers' cached answers for them must go.

    `event_id` numbers it in the store's token_events (commit order);
    `created_at` is the store's clock, in micros, when it was written.
    """

    event_id: int
    created_at: int
    token_ids: tuple[str, ...]
    user_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CachedUse:
    """Uses of a token a consumer answered from its cache, as it reported them."""

    token_id: str
    count: int
    last_used_at: int  # micros
