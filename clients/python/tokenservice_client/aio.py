"""The asyncio (`grpc.aio`) tokenservice client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
from google.protobuf import timestamp_pb2

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice.v1 import token_service_pb2_grpc as pb_grpc

from . import _requests
from .channel import (
    DEFAULT_RETRY,
    DEFAULT_TIMEOUT,
    ChannelOptions,
    RetryPolicy,
    bearer_call_credentials,
    channel_options,
    default_channel_credentials,
)
from .errors import error_from_rpc_error

__all__ = ["AsyncTokenServiceClient"]


class AsyncTokenServiceClient:
    """The `grpc.aio` twin of `TokenServiceClient`: same arguments, awaitable methods.

    Create it inside the event loop that will use it.
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
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._timeout = timeout
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._owns_channel = channel is None
        if channel is not None:
            if token:
                self._metadata = (("authorization", f"Bearer {token}"),)
            self._channel = channel
        else:
            if target is None:
                raise TypeError("give a target or a channel")
            opts = channel_options(retry, options)
            if insecure:
                if channel_credentials is not None:
                    raise ValueError("insecure=True contradicts channel_credentials")
                if token:
                    self._metadata = (("authorization", f"Bearer {token}"),)
                self._channel = grpc.aio.insecure_channel(target, options=opts)
            else:
                creds = channel_credentials or default_channel_credentials(target)
                if token:
                    creds = grpc.composite_channel_credentials(
                        creds, bearer_call_credentials(token)
                    )
                self._channel = grpc.aio.secure_channel(target, creds, options=opts)
        self._stub = pb_grpc.TokenServiceStub(self._channel)

    @property
    def channel(self) -> grpc.aio.Channel:
        return self._channel

    @property
    def timeout(self) -> float:
        return self._timeout

    async def _call(
        self,
        method: Any,
        request: Any,
        timeout: float | None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> Any:
        try:
            return await method(
                request,
                timeout=self._timeout if timeout is None else timeout,
                metadata=(*self._metadata, *metadata) or None,
            )
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc_error(err) from err

    async def create_token(
        self,
        name: str,
        scopes: Iterable[str],
        expires_at: datetime | timestamp_pb2.Timestamp | None = None,
        *,
        timeout: float | None = None,
    ) -> pb.CreateTokenResponse:
        request = _requests.create_token(name, scopes, expires_at)
        return await self._call(self._stub.CreateToken, request, timeout)

    async def list_tokens(
        self, page_size: int = 0, page_token: str = "", *, timeout: float | None = None
    ) -> pb.ListTokensResponse:
        request = pb.ListTokensRequest(page_size=page_size, page_token=page_token)
        return await self._call(self._stub.ListTokens, request, timeout)

    async def iter_tokens(
        self, page_size: int = 0, *, timeout: float | None = None
    ) -> AsyncIterator[pb.ApiToken]:
        page_token = ""
        while True:
            page = await self.list_tokens(page_size, page_token, timeout=timeout)
            for token in page.tokens:
                yield token
            if not page.next_page_token:
                return
            page_token = page.next_page_token

    async def get_token(self, token_id: str, *, timeout: float | None = None) -> pb.ApiToken:
        return await self._call(self._stub.GetToken, pb.GetTokenRequest(id=token_id), timeout)

    async def revoke_token(self, token_id: str, *, timeout: float | None = None) -> pb.ApiToken:
        request = pb.RevokeTokenRequest(id=token_id)
        return await self._call(self._stub.RevokeToken, request, timeout)

    async def authenticate(
        self,
        token: str,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> pb.AuthenticateResponse:
        request = pb.AuthenticateRequest(token=token)
        return await self._call(self._stub.Authenticate, request, timeout, metadata)

    async def list_scopes(self, *, timeout: float | None = None) -> pb.ListScopesResponse:
        return await self._call(self._stub.ListScopes, pb.ListScopesRequest(), timeout)

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
