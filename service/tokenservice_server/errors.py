"""Domain errors: small classes the gRPC layer maps to status codes in one place."""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error a caller may see; `message` is safe to show."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# What an error may echo back. gRPC sends the message and every violation in the
# trailers, which a client refuses past its metadata limit (8 KiB by default):
# an error must stay an INVALID_ARGUMENT however much the caller sent. These
# bounds keep the trailers under about 5 KiB, the message percent-encoded.
MAX_VIOLATIONS = 10
MAX_FIELD_CHARS = 80
MAX_DESCRIPTION_CHARS = 160
MAX_MESSAGE_CHARS = 400
MAX_SHOWN_CHARS = 40


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, the cut marked."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown(value: str) -> str:
    """A caller's value quoted for an error: ASCII only (control and bidirectional
    characters escaped) and at most about MAX_SHOWN_CHARS characters of it."""
    if len(value) <= MAX_SHOWN_CHARS:
        return ascii(value)
    return f"{ascii(value[:MAX_SHOWN_CHARS])}... ({len(value)} characters)"


def cap_violations(violations: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """At most MAX_VIOLATIONS (field, description) pairs, each clipped; the last
    says how many more there were."""
    capped = [
        (clip(ascii(f)[1:-1] if not f.isascii() else f, MAX_FIELD_CHARS),
         clip(d, MAX_DESCRIPTION_CHARS))
        for f, d in violations[:MAX_VIOLATIONS]
    ]
    if len(violations) > MAX_VIOLATIONS:
        rest = len(violations) - (MAX_VIOLATIONS - 1)
        capped[-1] = (capped[-1][0], f"and {rest} more problems, not listed")
    return capped


class InvalidArgument(DomainError):
    def __init__(self, violations: list[tuple[str, str]], message: str | None = None) -> None:
        self.violations = cap_violations(violations)
        if message is None:
            message = "; ".join(f"{field}: {desc}" for field, desc in self.violations)
        super().__init__(clip(message, MAX_MESSAGE_CHARS))


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
