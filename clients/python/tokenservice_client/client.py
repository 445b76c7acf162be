"""The synchronous tokenservice client."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from tokenservice.v1 import token_service_pb2 as pb

from ._base import UNSET, BaseTokenServiceClient, PreparedCall, RateLimitSpec, StateSpec
from .channel import ChannelOptions
from .principal import Principal

__all__ = ["TokenServiceClient"]


class TokenServiceClient(BaseTokenServiceClient[grpc.Channel]):
    """A typed client for `tokenservice.v1.TokenService`.

    `target` is a gRPC target such as `"localhost:50051"` or `"tokens.example.com:443"`.
    `token` is sent as `authorization: Bearer <token>` through gRPC call credentials;
    every call needs one except Authenticate, ListScopes and ReportLeakedTokens.

    Channel security: `channel_credentials` if given (`tls_channel_credentials(ca, cert,
    key)` for your own CA and a client certificate); otherwise local credentials for a
    loopback or Unix-socket target and TLS with the system's roots for anything else.
    `insecure=True` opens a plaintext channel (for a network you trust, such as a mesh
    sidecar) and sends the token as plain metadata. `channel` uses a channel you built;
    the client then neither adds the retry policy nor closes it.

    Every call has a deadline: `timeout` seconds (per call, or the client's default).
    Failures raise `TokenServiceError` subclasses.
    """

    def _open_channel(
        self, target: str, credentials: grpc.ChannelCredentials | None, options: ChannelOptions
    ) -> grpc.Channel:
        if credentials is None:
            return grpc.insecure_channel(target, options=options)
        return grpc.secure_channel(target, credentials, options=options)

    def _send(self, call: PreparedCall) -> Any:
        try:
            return call.method(call.request, **call.options)
        except grpc.RpcError as err:
            raise self._error(err) from err

    def create_token(
        self,
        name: str,
        scopes: Iterable[str],
        expires_at: datetime | timestamp_pb2.Timestamp | None = None,
        *,
        rate_limit: RateLimitSpec | None = None,
        timeout: float | None = None,
    ) -> pb.CreateTokenResponse:
        """Creates a token for the calling user; `.token` is the raw secret, shown once.

        `rate_limit`: `(requests, period)` (period a timedelta or seconds) or a
        `RateLimit` message; unset for the service default.
        """
        return self._send(self._create_token(name, scopes, expires_at, timeout, rate_limit))

    def list_tokens(
        self,
        page_size: int = 0,
        page_token: str = "",
        *,
        state: StateSpec | None = None,
        not_used_since: datetime | timestamp_pb2.Timestamp | None = None,
        timeout: float | None = None,
    ) -> pb.ListTokensResponse:
        """One page of tokens, newest first; an empty `next_page_token` ends the list.

        `state` ("ACTIVE", "EXPIRED", "REVOKED") and `not_used_since` filter; a
        page token works only with the filters it came with.
        """
        return self._send(
            self._list_tokens(page_size, page_token, timeout, state, not_used_since)
        )

    def iter_tokens(
        self,
        page_size: int = 0,
        *,
        state: StateSpec | None = None,
        not_used_since: datetime | timestamp_pb2.Timestamp | None = None,
        timeout: float | None = None,
    ) -> Iterator[pb.ApiToken]:
        """Every token matching the filters, following page tokens; `timeout` is per page."""
        page_token = ""
        while True:
            page = self.list_tokens(page_size, page_token, state=state,
                                    not_used_since=not_used_since, timeout=timeout)
            yield from page.tokens
            if not page.next_page_token:
                return
            page_token = page.next_page_token

    def get_token(self, token_id: str, *, timeout: float | None = None) -> pb.ApiToken:
        return self._send(self._get_token(token_id, timeout))

    def revoke_token(
        self, token_id: str, *, revoke_children: bool = False, timeout: float | None = None
    ) -> pb.ApiToken:
        """Revokes at once; revoking a revoked token returns it unchanged.

        `revoke_children` also revokes every token it minted, transitively.
        """
        return self._send(self._revoke_token(token_id, timeout, revoke_children))

    def rotate_token(
        self,
        token_id: str,
        grace_period: timedelta | float | duration_pb2.Duration = 0,
        *,
        timeout: float | None = None,
    ) -> pb.RotateTokenResponse:
        """Replaces a token; `.token` is the new raw secret, shown once.

        The old token keeps working for `grace_period` (0 to 7 days; 0 revokes
        it at once). Raises FailedPrecondition if it is not active or was
        already rotated.
        """
        return self._send(self._rotate_token(token_id, grace_period, timeout))

    def update_token(
        self,
        token_id: str,
        *,
        name: str = UNSET,
        scopes: Iterable[str] = UNSET,
        expires_at: datetime | timestamp_pb2.Timestamp | None = UNSET,
        rate_limit: RateLimitSpec | None = UNSET,
        timeout: float | None = None,
    ) -> pb.ApiToken:
        """Changes the fields given, and only those; `None` removes an expiry or a rate limit."""
        return self._send(
            self._update_token(token_id, name, scopes, expires_at, rate_limit, timeout)
        )

    def list_audit_events(
        self,
        page_size: int = 0,
        page_token: str = "",
        *,
        token_id: str = "",
        action: str = "",
        timeout: float | None = None,
    ) -> pb.ListAuditEventsResponse:
        """One page of the org's audit log, newest first (needs `api_token:admin`)."""
        return self._send(
            self._list_audit_events(page_size, page_token, token_id, action, timeout)
        )

    def iter_audit_events(
        self,
        page_size: int = 0,
        *,
        token_id: str = "",
        action: str = "",
        timeout: float | None = None,
    ) -> Iterator[pb.AuditEvent]:
        """Every audit event matching the filters, newest first, following page tokens."""
        page_token = ""
        while True:
            page = self.list_audit_events(page_size, page_token, token_id=token_id,
                                          action=action, timeout=timeout)
            yield from page.events
            if not page.next_page_token:
                return
            page_token = page.next_page_token

    def report_leaked_tokens(
        self, tokens: Iterable[str], source: str = "", *, timeout: float | None = None
    ) -> pb.ReportLeakedTokensResponse:
        """Reports raw tokens found in public (at most 100 a call); needs no credentials.

        Each one that is a real token is revoked with every token it minted.
        """
        return self._send(self._report_leaked_tokens(tokens, source, timeout))

    def authenticate(
        self,
        token: str,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> pb.AuthenticateResponse:
        """Verifies a raw token; raises `Unauthenticated` for any bad token.

        `metadata` is sent along, e.g. `x-forwarded-for` naming the original client
        (honoured only when this process is one of tokenservice's trusted proxies).
        """
        return self._send(self._authenticate(token, timeout, metadata))

    def authenticate_principal(
        self,
        token: str,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> Principal:
        """authenticate(), as a Principal whose rate limit standing carries the
        cache budget (the trailing metadata a lease cache keeps to)."""
        call = self._authenticate(token, timeout, metadata)
        try:
            response, rpc = call.method.with_call(call.request, **call.options)
        except grpc.RpcError as err:
            raise self._error(err) from err
        return Principal.from_response(response, rpc.trailing_metadata())

    def list_scopes(self, *, timeout: float | None = None) -> pb.ListScopesResponse:
        return self._send(self._list_scopes(timeout))

    def watch_token_events(
        self, requests: Iterator[pb.WatchTokenEventsRequest]
    ) -> Iterator[pb.TokenEvent]:
        """Opens the WatchTokenEvents stream (the client's token needs `api_token:verify`).

        No deadline: the stream lasts until either side ends it. Iterate the
        result for TokenEvents; it raises grpc.RpcError when the stream breaks,
        and `.cancel()` ends it. LeaseCache speaks the protocol for you.
        """
        return self._stub.WatchTokenEvents(requests, metadata=self._metadata)

    def close(self) -> None:
        """Closes the channel if this client opened it."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> TokenServiceClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
