"""Client library for tokenservice.

- `TokenServiceClient` / `AsyncTokenServiceClient`: typed clients with deadlines,
  gRPC-native retries on UNAVAILABLE and typed exceptions.
- `AuthInterceptor` / `AsyncAuthInterceptor`: protect a consumer gRPC service with
  tokenservice tokens; handlers read the caller through `current_principal()`, and
  callers get the token's rate limit standing as `ratelimit-*` metadata.
- `LeaseCache` / `AsyncLeaseCache`: the interceptors' opt-in cache of Authenticate's
  answers, kept safe by a lease: revocation stays immediate.
- `token_credentials`: the call credentials a client uses to present its token;
  `parse_bearer` reads one back from an `authorization` value.
- `tls_channel_credentials`: TLS to tokenservice with your own CA and, for mTLS,
  a client certificate.
- `find_tokens` / `is_token` / `TOKEN_REGEX`: recognise tokens in text by pattern
  and checksum, for secret scanners (`python -m tokenservice_client.scanning`).
- `peer_address`: the IP address in a gRPC peer string, IPv6 and IPv4-mapped included.
"""

from tokenservice.v1 import token_service_pb2, token_service_pb2_grpc

from .addresses import ip_address, peer_address
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
    TOKEN_RATE_LIMITED,
    DeadlineExceeded,
    ErrorInfo,
    FailedPrecondition,
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
from .principal import Principal, RateLimitStatus, current_principal
from .scanning import TOKEN_REGEX, find_tokens, is_token

__all__ = [
    "DEFAULT_PUBLIC_METHODS",
    "TOKEN_RATE_LIMITED",
    "DEFAULT_RETRY",
    "DEFAULT_TIMEOUT",
    "AsyncAuthInterceptor",
    "AsyncLeaseCache",
    "AsyncTokenServiceClient",
    "AuthInterceptor",
    "TOKEN_REGEX",
    "CacheStats",
    "DeadlineExceeded",
    "ErrorInfo",
    "FailedPrecondition",
    "FieldViolation",
    "InvalidArgument",
    "LeaseCache",
    "NotFound",
    "PermissionDenied",
    "Principal",
    "PrincipalCache",
    "RateLimitStatus",
    "RateLimited",
    "RetryPolicy",
    "TokenServiceClient",
    "TokenServiceError",
    "Unauthenticated",
    "Unavailable",
    "current_principal",
    "find_tokens",
    "is_token",
    "ip_address",
    "parse_bearer",
    "peer_address",
    "requires_scopes",
    "rotating_token_credentials",
    "service_config",
    "tls_channel_credentials",
    "token_credentials",
    "token_service_pb2",
    "token_service_pb2_grpc",
]
