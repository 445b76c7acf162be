"""Domain errors: small classes the gRPC layer maps to status codes in one place."""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error a caller may see; `message` is safe to show."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(DomainError):
    def __init__(self, violations: list[tuple[str, str]], message: str | None = None) -> None:
        self.violations = violations
        if message is None:
            message = "; ".join(f"{field}: {desc}" for field, desc in violations)
        super().__init__(message)


class Unauthenticated(DomainError):
    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        # Why, for metrics and logs only: callers see the one message whatever it is
        # (invalid, revoked, expired, disabled).
        self.reason = reason


class PermissionDenied(DomainError):
    pass


class NotFound(DomainError):
    pass


class AlreadyExists(DomainError):
    pass


class FailedPrecondition(DomainError):
    """The request is well formed but the token's state forbids it (rotating a revoked one)."""


# ErrorInfo reasons of RateLimited: a caller may act on which it is.
RATE_LIMITED = "RATE_LIMITED"  # too many failures, or the service is busy verifying
TOKEN_RATE_LIMITED = "TOKEN_RATE_LIMITED"  # a valid token over its own rate limit


class RateLimited(DomainError):
    def __init__(self, message: str, retry_after: float, reason: str = RATE_LIMITED) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.reason = reason
        # Set when the refusal is for a client address that keeps failing (not for
        # a busy bcrypt pool): the gRPC layer holds such answers back (a tarpit).
        self.client_throttled = False


class Unavailable(DomainError):
    pass


class Conflict(Exception):
    """A write the store refused because it would break a uniqueness rule.

    Not a DomainError: the rules decide what it means (a lookup id collision to
    draw again, an email already taken), so it never reaches a caller as is.
    """


# The one message every failed authentication gets, whatever the reason.
AUTH_FAILED = "invalid, expired or revoked token"
CALLER_UNAUTHENTICATED = "missing or invalid credentials"
