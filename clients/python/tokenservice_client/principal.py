"""Who is calling: the principal an interceptor hands to a protected handler."""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass
from datetime import UTC as _UTC
from datetime import datetime
from typing import Any

from tokenservice.v1 import token_service_pb2 as pb

__all__ = ["Principal", "RateLimitStatus", "current_principal"]


@dataclass(frozen=True)
class RateLimitStatus:
    """The calling token's standing against its rate limit, as of its Authenticate call."""

    # The calls the token may make per period.
    limit: int
    # The calls left in the window after this one; 0 when a call made at once would be
    # refused.
    remaining: int
    # When the token is fully rested (remaining back at limit).
    reset_time: datetime
    # The uses a lease cache may answer from memory before asking again (Authenticate's
    # trailing `tokenservice-cache-budget`, sent to a caller that asked). 0: none.
    cache_budget: int = 0

    @classmethod
    def from_proto(cls, status: pb.RateLimitStatus, cache_budget: int = 0) -> RateLimitStatus:
        return cls(status.limit, status.remaining, status.reset_time.ToDatetime(tzinfo=_UTC),
                   cache_budget)

    def headers(self, now: datetime | None = None) -> tuple[tuple[str, str], ...]:
        """The IETF `ratelimit-limit`, `-remaining` and `-reset` (whole seconds, rounded up)."""
        now = now or datetime.now(_UTC)
        reset = max(0, math.ceil((self.reset_time - now).total_seconds()))
        return (
            ("ratelimit-limit", str(self.limit)),
            ("ratelimit-remaining", str(self.remaining)),
            ("ratelimit-reset", str(reset)),
        )


@dataclass(frozen=True)
class Principal:
    """The verified owner of the calling token and what it may do."""

    token_id: str
    user_id: str
    email: str
    org_id: str
    scopes: frozenset[str]
    expires_at: datetime | None = None
    # Set when the token has a rate limit (its own, or the service default).
    rate_limit: RateLimitStatus | None = None

    @classmethod
    def from_response(
        cls, response: pb.AuthenticateResponse, trailing_metadata: Any = None
    ) -> Principal:
        """`trailing_metadata`: the call's, for the cache budget (none: a budget of 0)."""
        expires_at = (
            response.expires_at.ToDatetime(tzinfo=_UTC) if response.HasField("expires_at") else None
        )
        rate_limit = (
            RateLimitStatus.from_proto(response.rate_limit, _cache_budget(trailing_metadata))
            if response.HasField("rate_limit") else None
        )
        return cls(
            token_id=response.token_id,
            user_id=response.user_id,
            email=response.user_email,
            org_id=response.org_id,
            scopes=frozenset(response.scopes),
            expires_at=expires_at,
            rate_limit=rate_limit,
        )

    def has_scopes(self, *scopes: str) -> bool:
        return self.scopes.issuperset(scopes)


_CURRENT: contextvars.ContextVar[Principal] = contextvars.ContextVar("tokenservice_principal")


def current_principal() -> Principal:
    """The principal of the RPC being handled.

    Raises LookupError outside a handler protected by an auth interceptor (and in a
    method the interceptor lets through as public).
    """
    try:
        return _CURRENT.get()
    except LookupError:
        raise LookupError(
            "no authenticated principal: is this method protected by AuthInterceptor?"
        ) from None


CACHE_BUDGET_METADATA = "tokenservice-cache-budget"
# Sent with Authenticate by a lease cache: it asks for a cache budget.
ASK_CACHE_BUDGET = ((CACHE_BUDGET_METADATA, "1"),)


def _cache_budget(metadata: Any) -> int:
    for key, value in metadata or ():
        if key == CACHE_BUDGET_METADATA:
            try:
                return max(0, int(value))
            except (TypeError, ValueError):
                return 0
    return 0
