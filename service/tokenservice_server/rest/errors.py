"""The REST error shape, and how each gRPC status maps to an HTTP status and error code.

Every error leaves the shim as

    {"error": {"code": "validation_error", "message": "...",
               "details": [{"field": "scopes", "description": "..."}]}}

Field paths in `details` use the proto JSON names (lowerCamelCase), which is what
a REST caller sent, even when the gRPC server named the proto field.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from google.protobuf.descriptor import Descriptor
from google.rpc import error_details_pb2, status_pb2

from ..errors import cap_violations
from .routes import resolve_prefix

# gRPC status -> (HTTP status, error code). Anything not listed is a 500.
STATUS_MAP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (422, "validation_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "unauthorized"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "forbidden"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found"),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "conflict"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limited"),
    grpc.StatusCode.UNAVAILABLE: (503, "unavailable"),
}
INTERNAL = (500, "internal_error")

# For these the server's message is passed through; for the rest (internal
# failures, unreachable backends) it may carry a stack trace or an internal
# address, so the caller gets a fixed message instead.
_PASS_MESSAGE = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
_FIXED_MESSAGE = {
    grpc.StatusCode.UNAVAILABLE: "The service is unavailable; try again later.",
}
_INTERNAL_MESSAGE = "An internal error occurred."

_DETAILS_KEY = "grpc-status-details-bin"


@dataclass
class ApiError(Exception):
    """An error response: raised anywhere in the shim, rendered once by the app."""

    status: int
    code: str
    message: str
    details: list[dict[str, str]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


def validation_error(message: str, *violations: tuple[str, str]) -> ApiError:
    """A 422; like the server's errors it echoes at most a few clipped violations."""
    details = [{"field": f, "description": d} for f, d in cap_violations(list(violations))]
    return ApiError(422, "validation_error", message, details)


def not_found(message: str = "No such resource.") -> ApiError:
    return ApiError(404, "not_found", message)


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def internal_error() -> ApiError:
    return ApiError(500, "internal_error", _INTERNAL_MESSAGE)


def to_json_name(name: str) -> str:
    """protoc's json_name rule: drop each underscore and upper-case the letter after it."""
    out, upper = [], False
    for ch in name:
        if ch == "_":
            upper = True
        elif upper:
            out.append(ch.upper())
            upper = False
        else:
            out.append(ch)
    return "".join(out)


_SEGMENT = re.compile(r"([^\[\]]+)((?:\[[^\]]*\])*)")


def json_field_path(path: str, message: Descriptor | None) -> str:
    """Rewrites a proto field path (`api_token.expires_at`, `scopes[1]`) into JSON names.

    Uses the message descriptor where the path resolves, protoc's rule elsewhere,
    and leaves a path that is already lowerCamelCase as it is.
    """
    segments = path.split(".")
    matches = [_SEGMENT.fullmatch(segment) for segment in segments]
    names = list(itertools.takewhile(bool, (m.group(1) if m else "" for m in matches)))
    fields = resolve_prefix(message, names, json_names=True)
    out = []
    for i, (segment, m) in enumerate(zip(segments, matches, strict=True)):
        if m is None:
            out.append(segment)
            continue
        name = fields[i].json_name if i < len(fields) else to_json_name(m.group(1))
        out.append(name + m.group(2))
    return ".".join(out)


class FailedCall(Protocol):
    """A failed call as the shim reads it: grpc.aio.AioRpcError from a gRPC channel, or
    inprocess.RpcFailure from a handler called in process; the same three methods."""

    def code(self) -> grpc.StatusCode: ...

    def details(self) -> str | None: ...

    def trailing_metadata(self) -> Any: ...


def _rich_status(err: FailedCall | grpc.RpcError) -> status_pb2.Status | None:
    try:
        trailing = err.trailing_metadata() or ()
    except Exception:  # a locally generated error may have none
        return None
    for key, value in trailing:
        if key == _DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except Exception:
                return None
    return None


def from_rpc_error(
    err: FailedCall | grpc.RpcError, request: Descriptor | None, body_field: str = ""
) -> ApiError:
    """The REST error for a failed RPC, with BadRequest violations and RetryInfo.

    The same for a call over a channel and one in process: both carry the status
    code, its details and the google.rpc.Status in `grpc-status-details-bin`.

    `body_field` is the route's body when it is one field (PATCH's `api_token`):
    the caller sent that message's fields at the top level, so violations are
    named from there (`expiresAt`, not `apiToken.expiresAt`).
    """
    body_prefix = json_field_path(body_field, request) + "." if body_field else ""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    status, error_code = STATUS_MAP.get(code, INTERNAL)
    if code in _PASS_MESSAGE:
        message = (err.details() if hasattr(err, "details") else "") or code.name.lower()
    else:
        message = _FIXED_MESSAGE.get(code, _INTERNAL_MESSAGE)
    api_error = ApiError(status, error_code, message)
    rich = _rich_status(err) if code in _PASS_MESSAGE else None
    if rich is not None:
        for detail in rich.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                for violation in bad_request.field_violations:
                    json_path = json_field_path(violation.field, request)
                    if body_prefix and json_path.startswith(body_prefix):
                        json_path = json_path[len(body_prefix):]
                    api_error.details.append(
                        {"field": json_path, "description": violation.description}
                    )
                    if json_path != violation.field and violation.field:
                        # The message names fields too; name them as the caller did.
                        api_error.message = re.sub(
                            rf"\b{re.escape(violation.field)}\b", json_path, api_error.message
                        )
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR) and status == 429:
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                delay = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
                api_error.headers["Retry-After"] = str(max(1, math.ceil(delay)))
    if status == 401:
        api_error.headers["WWW-Authenticate"] = "Bearer"
    return api_error
