"""Bearer credentials: how a client presents its token, and how a server reads it back.

The one-liner, for a service reached over TLS::

    channel = grpc.secure_channel("passes.example.com:443", token_credentials(token))

and for a service on this machine (no TLS, but gRPC still attaches the token because
the connection never leaves the host)::

    channel = grpc.secure_channel(
        "localhost:50061", token_credentials(token, grpc.local_channel_credentials())
    )

gRPC refuses to send call credentials over `grpc.insecure_channel`; that is a feature.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

__all__ = ["parse_bearer", "rotating_token_credentials", "token_credentials"]


def parse_bearer(value: str) -> str | None:
    """The token of an `authorization` value `Bearer <token>`, else None.

    The one reading of the header for tokenservice, its REST shim and the consumer
    interceptors, so they agree on what counts as a bearer token: the scheme in any
    case, surrounding white space ignored, and an empty token is no token.
    """
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def token_credentials(
    token: str, channel_credentials: grpc.ChannelCredentials | None = None
) -> grpc.ChannelCredentials:
    """Channel credentials that send `authorization: Bearer <token>` on every call.

    `channel_credentials` defaults to TLS with the system's roots.
    """
    return grpc.composite_channel_credentials(
        channel_credentials or grpc.ssl_channel_credentials(),
        grpc.access_token_call_credentials(token),
    )


class _RotatingToken(grpc.AuthMetadataPlugin):
    def __init__(self, get_token: Callable[[], str]) -> None:
        self._get_token = get_token

    def __call__(
        self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback
    ) -> None:
        try:
            token = self._get_token()
        except Exception as exc:  # reported to the caller as UNAVAILABLE by gRPC
            callback((), exc)
            return
        callback((("authorization", f"Bearer {token}"),), None)


def rotating_token_credentials(
    get_token: Callable[[], str], channel_credentials: grpc.ChannelCredentials | None = None
) -> grpc.ChannelCredentials:
    """Like `token_credentials`, but asks `get_token()` for the token on every call.

    For tokens read from a file or a secret store that rotates them. `get_token` runs
    on a gRPC thread and must not block for long.
    """
    return grpc.composite_channel_credentials(
        channel_credentials or grpc.ssl_channel_credentials(),
        grpc.metadata_call_credentials(_RotatingToken(get_token), name="tokenservice"),
    )
