"""Typed exceptions for tokenservice calls.

Every failed RPC surfaces as a `TokenServiceError` (or a subclass picked by its status
code), carrying the code, the message, the `google.rpc.BadRequest` field violations,
the `google.rpc.ErrorInfo` reason and the `google.rpc.RetryInfo` delay when the server
sent them. Catch the subclass you can act on; the original `grpc.RpcError` is chained
as `__cause__`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "TOKEN_RATE_LIMITED",
    "DeadlineExceeded",
    "ErrorInfo",
    "FailedPrecondition",
    "FieldViolation",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "TokenServiceError",
    "Unauthenticated",
    "Unavailable",
    "error_from_rpc_error",
]


# The ErrorInfo reason of a valid token over its own rate limit (RateLimited): not a
# failed authentication, and over once `retry_delay` has passed.
TOKEN_RATE_LIMITED = "TOKEN_RATE_LIMITED"


@dataclass(frozen=True)
class FieldViolation:
    """One offending request field, from a `google.rpc.BadRequest` detail."""

    field: str
    description: str


@dataclass(frozen=True)
class ErrorInfo:
    """The machine-readable reason from a `google.rpc.ErrorInfo` detail."""

    reason: str
    domain: str
    metadata: Mapping[str, str] = field(default_factory=dict)


class TokenServiceError(Exception):
    """A tokenservice RPC failed; `.code` says how, `.field_violations` says where."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        field_violations: tuple[FieldViolation, ...] = (),
        error_info: ErrorInfo | None = None,
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}" if message else code.name)
        self.code = code
        self.message = message
        self.field_violations = field_violations
        self.error_info = error_info
        # Seconds to wait before the same call may succeed (RetryInfo), when given.
        self.retry_delay = retry_delay

    @property
    def reason(self) -> str:
        """The ErrorInfo reason, or "" when the server sent none."""
        return self.error_info.reason if self.error_info is not None else ""

    @property
    def fields(self) -> list[str]:
        """The names of the offending fields, in the server's order."""
        return [v.field for v in self.field_violations]


class InvalidArgument(TokenServiceError):
    """INVALID_ARGUMENT: see `.field_violations` for each offending field."""


class Unauthenticated(TokenServiceError):
    """UNAUTHENTICATED: the token is missing, malformed, unknown, revoked or expired."""


class PermissionDenied(TokenServiceError):
    """PERMISSION_DENIED: the token is valid but lacks a required scope."""


class NotFound(TokenServiceError):
    """NOT_FOUND: no such token within the caller's reach."""


class FailedPrecondition(TokenServiceError):
    """FAILED_PRECONDITION: the token's state forbids it (rotating a revoked or rotated token)."""


class RateLimited(TokenServiceError):
    """RESOURCE_EXHAUSTED: too many failed authentications from this address, or (reason
    TOKEN_RATE_LIMITED) a valid token over its rate limit; `retry_delay` says when to retry."""


class Unavailable(TokenServiceError):
    """UNAVAILABLE after the channel's retry policy gave up."""


class DeadlineExceeded(TokenServiceError):
    """DEADLINE_EXCEEDED: the call's deadline passed before an answer came."""


_BY_CODE: dict[grpc.StatusCode, type[TokenServiceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimited,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def _rich_status(err: grpc.RpcError) -> status_pb2.Status | None:
    # Works for sync calls and for grpc.aio.AioRpcError alike: both expose code(),
    # details() and trailing_metadata() as plain methods.
    try:
        return rpc_status.from_call(err)  # type: ignore[arg-type]
    except (ValueError, AttributeError):
        # ValueError: the status detail disagrees with the call's code or message,
        # which means a proxy rewrote one of them; trust the call, drop the details.
        return None


def error_from_rpc_error(err: grpc.RpcError) -> TokenServiceError:
    """Builds the typed exception for a failed call (sync or aio)."""
    code: grpc.StatusCode = err.code()  # type: ignore[attr-defined]
    message: str = err.details() or ""  # type: ignore[attr-defined]
    violations: list[FieldViolation] = []
    info: ErrorInfo | None = None
    retry_delay: float | None = None
    status = _rich_status(err)
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations.extend(
                    FieldViolation(v.field, v.description) for v in bad_request.field_violations
                )
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) and info is None:
                error_info = error_details_pb2.ErrorInfo()
                detail.Unpack(error_info)
                info = ErrorInfo(error_info.reason, error_info.domain, dict(error_info.metadata))
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR) and retry_delay is None:
                retry_info = error_details_pb2.RetryInfo()
                detail.Unpack(retry_info)
                retry_delay = retry_info.retry_delay.ToNanoseconds() / 1e9
    cls = _BY_CODE.get(code, TokenServiceError)
    return cls(code, message, tuple(violations), info, retry_delay)
