"""What the sync and asyncio clients share: channel set-up, requests, metadata, errors.

As in httpx's `BaseClient`, everything that does no I/O lives here once;
`TokenServiceClient` and `AsyncTokenServiceClient` only open the channel and
send, so the two cannot drift apart in what they ask or how they fail.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice.v1 import token_service_pb2_grpc as pb_grpc

from .channel import (
    DEFAULT_RETRY,
    DEFAULT_TIMEOUT,
    ChannelOptions,
    RetryPolicy,
    bearer_call_credentials,
    channel_options,
    default_channel_credentials,
)
from .errors import TokenServiceError, error_from_rpc_error

__all__ = ["BaseTokenServiceClient", "PreparedCall", "timestamp"]

# grpc.Channel for the sync client, grpc.aio.Channel for the asyncio one.
ChannelT = TypeVar("ChannelT")


def timestamp(value: datetime | timestamp_pb2.Timestamp) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp; a naive datetime is refused rather than guessed at."""
    if isinstance(value, timestamp_pb2.Timestamp):
        return value
    if value.tzinfo is None:
        raise ValueError("expires_at must be timezone-aware (for example datetime.now(UTC))")
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


@dataclass(frozen=True)
class PreparedCall:
    """One RPC ready to send: the stub's method, the request and the call's options."""

    method: Any
    request: Message
    options: dict[str, Any]


class BaseTokenServiceClient(Generic[ChannelT]):
    """Builds the channel, the requests and the per-call options; maps failures.

    Subclasses supply `_open_channel` (sync or `grpc.aio`) and the I/O: calling
    `PreparedCall.method` and, on `grpc.RpcError`, raising `_error(err)`.
    """

    def __init__(
        self,
        target: str | None = None,
        token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        channel_credentials: grpc.ChannelCredentials | None = None,
        insecure: bool = False,
        retry: RetryPolicy | None = DEFAULT_RETRY,
        options: ChannelOptions = (),
        channel: ChannelT | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._timeout = timeout
        self._owns_channel = channel is None
        # The token travels in call credentials on a secure channel this client
        # opens; on a given or an insecure channel it is plain metadata.
        metadata_token = token
        if channel is None:
            if target is None:
                raise TypeError("give a target or a channel")
            opts = channel_options(retry, options)
            if insecure:
                if channel_credentials is not None:
                    raise ValueError("insecure=True contradicts channel_credentials")
                channel = self._open_channel(target, None, opts)
            else:
                creds = channel_credentials or default_channel_credentials(target)
                if token:
                    creds = grpc.composite_channel_credentials(
                        creds, bearer_call_credentials(token)
                    )
                metadata_token = None
                channel = self._open_channel(target, creds, opts)
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {metadata_token}"),) if metadata_token else ()
        )
        self._channel: ChannelT = channel
        self._stub = pb_grpc.TokenServiceStub(channel)

    def _open_channel(
        self,
        target: str, credentials: grpc.ChannelCredentials | None, options: ChannelOptions
    ) -> ChannelT:
        """A channel to target: plaintext when credentials is None."""
        raise NotImplementedError

    @property
    def channel(self) -> ChannelT:
        return self._channel

    @property
    def timeout(self) -> float:
        return self._timeout

    # -- requests ------------------------------------------------------------

    def _prepare(
        self,
        method: Any,
        request: Message,
        timeout: float | None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> PreparedCall:
        options = {
            "timeout": self._timeout if timeout is None else timeout,
            "metadata": (*self._metadata, *metadata) or None,
        }
        return PreparedCall(method, request, options)

    def _create_token(
        self,
        name: str,
        scopes: Iterable[str],
        expires_at: datetime | timestamp_pb2.Timestamp | None,
        timeout: float | None,
    ) -> PreparedCall:
        if isinstance(scopes, str):
            raise TypeError("scopes must be an iterable of scope names, not one string")
        request = pb.CreateTokenRequest(name=name, scopes=list(scopes))
        if expires_at is not None:
            request.expires_at.CopyFrom(timestamp(expires_at))
        return self._prepare(self._stub.CreateToken, request, timeout)

    def _list_tokens(self, page_size: int, page_token: str, timeout: float | None) -> PreparedCall:
        request = pb.ListTokensRequest(page_size=page_size, page_token=page_token)
        return self._prepare(self._stub.ListTokens, request, timeout)

    def _get_token(self, token_id: str, timeout: float | None) -> PreparedCall:
        return self._prepare(self._stub.GetToken, pb.GetTokenRequest(id=token_id), timeout)

    def _revoke_token(self, token_id: str, timeout: float | None) -> PreparedCall:
        return self._prepare(self._stub.RevokeToken, pb.RevokeTokenRequest(id=token_id), timeout)

    def _authenticate(
        self, token: str, timeout: float | None, metadata: Sequence[tuple[str, str]]
    ) -> PreparedCall:
        request = pb.AuthenticateRequest(token=token)
        return self._prepare(self._stub.Authenticate, request, timeout, metadata)

    def _list_scopes(self, timeout: float | None) -> PreparedCall:
        return self._prepare(self._stub.ListScopes, pb.ListScopesRequest(), timeout)

    # -- failures ------------------------------------------------------------

    @staticmethod
    def _error(err: grpc.RpcError) -> TokenServiceError:
        """The typed exception a failed call raises (chained to err by the caller)."""
        return error_from_rpc_error(err)
