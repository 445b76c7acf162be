"""The asyncio (`grpc.aio`) tokenservice client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
from google.protobuf import duration_pb2, timestamp_pb2

from tokenservice.v1 import token_service_pb2 as pb

from ._base import UNSET, BaseTokenServiceClient, PreparedCall, RateLimitSpec, StateSpec
from .channel import ChannelOptions
from .principal import Principal

__all__ = ["AsyncTokenServiceClient"]


class AsyncTokenServiceClient(BaseTokenServiceClient[grpc.aio.Channel]):
    """The `grpc.aio` twin of `TokenServiceClient`: same arguments, awaitable methods.

    Create it inside the event loop that will use it.
    """

    def _open_channel(
        self, target: str, credentials: grpc.ChannelCredentials | None, options: ChannelOptions
    ) -> grpc.aio.Channel:
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, credentials, options=options)

    async def _send(self, call: PreparedCall) -> Any:
        try:
            return await call.method(call.request, **call.options)
        except grpc.aio.AioRpcError as err:
            raise self._error(err) from err

    async def create_token(
        self,
        name: str,
        scopes: Iterable[str],
        expires_at: datetime | timestamp_pb2.Timestamp | None = None,
        *,
        rate_limit: RateLimitSpec | None = None,
        timeout: float | None = None,
    ) -> pb.CreateTokenResponse:
        return await self._send(
            self._create_token(name, scopes, expires_at, timeout, rate_limit)
        )

    async def list_tokens(
        self,
        page_size: int = 0,
        page_token: str = "",
        *,
        state: StateSpec | None = None,
        not_used_since: datetime | timestamp_pb2.Timestamp | None = None,
        timeout: float | None = None,
    ) -> pb.ListTokensResponse:
        return await self._send(
            self._list_tokens(page_size, page_token, timeout, state, not_used_since)
        )

    async def iter_tokens(
        self,
        page_size: int = 0,
        *,
        state: StateSpec | None = None,
        not_used_since: datetime | timestamp_pb2.Timestamp | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[pb.ApiToken]:
        page_token = ""
        while True:
            page = await self.list_tokens(page_size, page_token, state=state,
                                          not_used_since=not_used_since, timeout=timeout)
            for token in page.tokens:
                yield token
            if not page.next_page_token:
                return
            page_token = page.next_page_token

    async def get_token(self, token_id: str, *, timeout: float | None = None) -> pb.ApiToken:
        return await self._send(self._get_token(token_id, timeout))

    async def revoke_token(
        self, token_id: str, *, revoke_children: bool = False, timeout: float | None = None
    ) -> pb.ApiToken:
        return await self._send(self._revoke_token(token_id, timeout, revoke_children))

    async def rotate_token(
        self,
        token_id: str,
        grace_period: timedelta | float | duration_pb2.Duration = 0,
        *,
        timeout: float | None = None,
    ) -> pb.RotateTokenResponse:
        return await self._send(self._rotate_token(token_id, grace_period, timeout))

    async def update_token(
        self,
        token_id: str,
        *,
        name: str = UNSET,
        scopes: Iterable[str] = UNSET,
        expires_at: datetime | timestamp_pb2.Timestamp | None = UNSET,
        rate_limit: RateLimitSpec | None = UNSET,
        timeout: float | None = None,
    ) -> pb.ApiToken:
        return await self._send(
            self._update_token(token_id, name, scopes, expires_at, rate_limit, timeout)
        )

    async def list_audit_events(
        self,
        page_size: int = 0,
        page_token: str = "",
        *,
        token_id: str = "",
        action: str = "",
        timeout: float | None = None,
    ) -> pb.ListAuditEventsResponse:
        return await self._send(
            self._list_audit_events(page_size, page_token, token_id, action, timeout)
        )

    async def iter_audit_events(
        self,
        page_size: int = 0,
        *,
        token_id: str = "",
        action: str = "",
        timeout: float | None = None,
    ) -> AsyncIterator[pb.AuditEvent]:
        page_token = ""
        while True:
            page = await self.list_audit_events(page_size, page_token, token_id=token_id,
                                                action=action, timeout=timeout)
            for event in page.events:
                yield event
            if not page.next_page_token:
                return
            page_token = page.next_page_token

    async def report_leaked_tokens(
        self, tokens: Iterable[str], source: str = "", *, timeout: float | None = None
    ) -> pb.ReportLeakedTokensResponse:
        return await self._send(self._report_leaked_tokens(tokens, source, timeout))

    async def authenticate(
        self,
        token: str,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> pb.AuthenticateResponse:
        return await self._send(self._authenticate(token, timeout, metadata))

    async def authenticate_principal(
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
            rpc = call.method(call.request, **call.options)
            response = await rpc
            trailing = await rpc.trailing_metadata()
        except grpc.aio.AioRpcError as err:
            raise self._error(err) from err
        return Principal.from_response(response, trailing)

    async def list_scopes(self, *, timeout: float | None = None) -> pb.ListScopesResponse:
        return await self._send(self._list_scopes(timeout))

    def watch_token_events(self) -> Any:
        """Opens the WatchTokenEvents stream (the client's token needs `api_token:verify`).

        Returns the grpc.aio call: `write()` requests, `read()` TokenEvents. No
        deadline: the stream lasts until either side ends it. AsyncLeaseCache
        speaks the protocol for you.
        """
        return self._stub.WatchTokenEvents(metadata=self._metadata)

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> AsyncTokenServiceClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
