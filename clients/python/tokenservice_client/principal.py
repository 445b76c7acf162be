"""Who is calling: the principal an interceptor hands to a protected handler."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from datetime import UTC as _UTC
from datetime import datetime

from tokenservice.v1 import token_service_pb2 as pb

__all__ = ["Principal", "current_principal"]


@dataclass(frozen=True)
class Principal:
    """The verified owner of the calling token and what it may do."""

    token_id: str
    user_id: str
    email: str
    org_id: str
    scopes: frozenset[str]
    expires_at: datetime | None = None

    @classmethod
    def from_response(cls, response: pb.AuthenticateResponse) -> Principal:
        expires_at = (
            response.expires_at.ToDatetime(tzinfo=_UTC) if response.HasField("expires_at") else None
        )
        return cls(
            token_id=response.token_id,
            user_id=response.user_id,
            email=response.user_email,
            org_id=response.org_id,
            scopes=frozenset(response.scopes),
            expires_at=expires_at,
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
