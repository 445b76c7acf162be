"""Client library for tokenservice.

- `TokenServiceClient` / `AsyncTokenServiceClient`: typed clients with deadlines,
  gRPC-native retries on UNAVAILABLE and typed exceptions.
- `AuthInterceptor` / `AsyncAuthInterceptor`: protect a consumer gRPC service with
  tokenservice tokens; handlers read the caller through `current_principal()`.
- `LeaseCache` / `AsyncLeaseCache`: the interceptors' opt-in cache of Authenticate's
  answers, kept safe by a lease: revocation stays immediate.
- `token_credentials`: the call credentials a client uses to present its token;
  `parse_bearer` reads one back from an `authorization` value.
- `tls_channel_credentials`: TLS to tokenservice with your own CA and, for mTLS,
  a client certificate.
"""

from tokenservice.v1 import token_service_pb2, token_service_pb2_grpc

from .aio import AsyncTokenServiceClient
from .channel import (
    DEFAULT_RETRY,
    DEFAULT_TIMEOUT,
    RetryPolicy,
    service_config,
    tls_channel_credentials,
)
from .client import TokenServiceClient
from .credentials import parse_bearer, rotating_token_credentials, token_credentials
from .errors import (
    DeadlineExceeded,
    ErrorInfo,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
    TokenServiceError,
    Unauthenticated,
    Unavailable,
)
from .interceptor import (
    DEFAULT_PUBLIC_METHODS,
    AsyncAuthInterceptor,
    AuthInterceptor,
    PrincipalCache,
    requires_scopes,
)
from .lease import AsyncLeaseCache, CacheStats, LeaseCache
from .principal import Principal, current_principal

__all__ = [
    "DEFAULT_PUBLIC_METHODS",
    "DEFAULT_RETRY",
    "DEFAULT_TIMEOUT",
    "AsyncAuthInterceptor",
    "AsyncLeaseCache",
    "AsyncTokenServiceClient",
    "AuthInterceptor",
    "CacheStats",
    "DeadlineExceeded",
    "ErrorInfo",
    "FieldViolation",
    "InvalidArgument",
    "LeaseCache",
    "NotFound",
    "PermissionDenied",
    "Principal",
    "PrincipalCache",
    "RateLimited",
    "RetryPolicy",
    "TokenServiceClient",
    "TokenServiceError",
    "Unauthenticated",
    "Unavailable",
    "current_principal",
    "parse_bearer",
    "requires_scopes",
    "rotating_token_credentials",
    "service_config",
    "tls_channel_credentials",
    "token_credentials",
    "token_service_pb2",
    "token_service_pb2_grpc",
]
