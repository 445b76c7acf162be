"""What the sync and asyncio clients share: channel set-up, requests, metadata, errors.

As in httpx's `BaseClient`, everything that does no I/O lives here once;
`TokenServiceClient` and `AsyncTokenServiceClient` only open the channel and
send, so the two cannot drift apart in what they ask or how they fail.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2
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

__all__ = [
    "UNSET",
    "BaseTokenServiceClient",
    "PreparedCall",
    "RateLimitSpec",
    "StateSpec",
    "duration",
    "rate_limit",
    "timestamp",
]

# grpc.Channel for the sync client, grpc.aio.Channel for the asyncio one.
ChannelT = TypeVar("ChannelT")

# A token's rate limit: the message, or (requests, period) with the period a
# timedelta or seconds.
RateLimitSpec = pb.RateLimit | tuple[int, timedelta | float]
# A state filter: pb.ApiToken.ACTIVE or its name, "ACTIVE".
StateSpec = int | str


class _Unset:
    """The default of update_token's fields: not in the update mask."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


def duration(value: timedelta | float | duration_pb2.Duration) -> duration_pb2.Duration:
    """A protobuf Duration from a timedelta or seconds."""
    if isinstance(value, duration_pb2.Duration):
        return value
    out = duration_pb2.Duration()
    if isinstance(value, timedelta):
        out.FromTimedelta(value)
    else:
        out.FromNanoseconds(round(value * 1e9))
    return out


def rate_limit(value: RateLimitSpec) -> pb.RateLimit:
    if isinstance(value, pb.RateLimit):
        return value
    requests, period = value
    return pb.RateLimit(requests=requests, period=duration(period))


def _state(value: StateSpec | None) -> int:
    if value is None:
        return pb.ApiToken.STATE_UNSPECIFIED
    if isinstance(value, str):
        return pb.ApiToken.State.Value(value.upper())
    return value


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
        limit: RateLimitSpec | None = None,
    ) -> PreparedCall:
        if isinstance(scopes, str):
            raise TypeError("scopes must be an iterable of scope names, not one string")
        request = pb.CreateTokenRequest(name=name, scopes=list(scopes))
        if expires_at is not None:
            request.expires_at.CopyFrom(timestamp(expires_at))
        if limit is not None:
            request.rate_limit.CopyFrom(rate_limit(limit))
        return self._prepare(self._stub.CreateToken, request, timeout)

    def _list_tokens(
        self,
        page_size: int,
        page_token: str,
        timeout: float | None,
        state: StateSpec | None = None,
        not_used_since: datetime | timestamp_pb2.Timestamp | None = None,
    ) -> PreparedCall:
        request = pb.ListTokensRequest(
            page_size=page_size, page_token=page_token, state=_state(state)
        )
        if not_used_since is not None:
            request.not_used_since.CopyFrom(timestamp(not_used_since))
        return self._prepare(self._stub.ListTokens, request, timeout)

    def _get_token(self, token_id: str, timeout: float | None) -> PreparedCall:
        return self._prepare(self._stub.GetToken, pb.GetTokenRequest(id=token_id), timeout)

    def _revoke_token(
        self, token_id: str, timeout: float | None, revoke_children: bool = False
    ) -> PreparedCall:
        request = pb.RevokeTokenRequest(id=token_id, revoke_children=revoke_children)
        return self._prepare(self._stub.RevokeToken, request, timeout)

    def _rotate_token(
        self,
        token_id: str,
        grace_period: timedelta | float | duration_pb2.Duration,
        timeout: float | None,
    ) -> PreparedCall:
        request = pb.RotateTokenRequest(id=token_id, grace_period=duration(grace_period))
        return self._prepare(self._stub.RotateToken, request, timeout)

    def _update_token(
        self,
        token_id: str,
        name: Any,
        scopes: Any,
        expires_at: Any,
        limit: Any,
        timeout: float | None,
    ) -> PreparedCall:
        """Every field not UNSET goes into the update mask; None clears expiry or limit."""
        token = pb.ApiToken(id=token_id)
        paths = []
        if name is not UNSET:
            token.name = name
            paths.append("name")
        if scopes is not UNSET:
            if isinstance(scopes, str):
                raise TypeError("scopes must be an iterable of scope names, not one string")
            token.scopes.extend(scopes)
            paths.append("scopes")
        if expires_at is not UNSET:
            if expires_at is not None:
                token.expires_at.CopyFrom(timestamp(expires_at))
            paths.append("expires_at")
        if limit is not UNSET:
            if limit is not None:
                token.rate_limit.CopyFrom(rate_limit(limit))
            paths.append("rate_limit")
        if not paths:
            raise TypeError("update_token needs at least one field to change")
        request = pb.UpdateTokenRequest(
            api_token=token, update_mask=field_mask_pb2.FieldMask(paths=paths)
        )
        return self._prepare(self._stub.UpdateToken, request, timeout)

    def _list_audit_events(
        self, page_size: int, page_token: str, token_id: str, action: str,
        timeout: float | None,
    ) -> PreparedCall:
        request = pb.ListAuditEventsRequest(
            page_size=page_size, page_token=page_token, token_id=token_id, action=action
        )
        return self._prepare(self._stub.ListAuditEvents, request, timeout)

    def _report_leaked_tokens(
        self, tokens: Iterable[str], source: str, timeout: float | None
    ) -> PreparedCall:
        if isinstance(tokens, str):
            raise TypeError("tokens must be an iterable of raw tokens, not one string")
        request = pb.ReportLeakedTokensRequest(tokens=list(tokens), source=source)
        return self._prepare(self._stub.ReportLeakedTokens, request, timeout)

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
