"""Which caller each RPC needs: the one table the gRPC layer, the REST shim and OpenAPI read."""

from __future__ import annotations

import enum

from tokenservice.v1 import token_service_pb2 as pb

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["TokenService"].full_name


class Caller(enum.Enum):
    """What an RPC asks of its caller before the rules run."""

    # No credentials: the request itself is the credential (Authenticate,
    # ReportLeakedTokens) or the answer is public (ListScopes).
    ANONYMOUS = "anonymous"
    # `authorization: Bearer <token>` metadata, verified before the method runs.
    BEARER = "bearer"


# Every RPC of tokenservice.v1.TokenService, by method name. A method missing
# here is refused by the gRPC layer and fails tests/test_policy.py.
CALLER_POLICY: dict[str, Caller] = {
    "CreateToken": Caller.BEARER,
    "ListTokens": Caller.BEARER,
    "GetToken": Caller.BEARER,
    "RevokeToken": Caller.BEARER,
    "RotateToken": Caller.BEARER,
    "UpdateToken": Caller.BEARER,
    "ListAuditEvents": Caller.BEARER,
    "Authenticate": Caller.ANONYMOUS,
    # The raw tokens reported are the credential: whoever holds a leaked secret
    # may have it revoked. Throttled like Authenticate.
    "ReportLeakedTokens": Caller.ANONYMOUS,
    "ListScopes": Caller.ANONYMOUS,
    # A stream: the interceptor authenticates the caller when the stream opens,
    # and the rules require the scope api_token:verify.
    "WatchTokenEvents": Caller.BEARER,
}


def caller_for(full_method: str) -> Caller | None:
    """The policy for `/pkg.Service/Method` or `pkg.Service.Method`; None if not declared."""
    name = full_method.lstrip("/").replace("/", ".")
    service, _, method = name.rpartition(".")
    if service != SERVICE_NAME:
        return None
    return CALLER_POLICY.get(method)
