"""The synchronous tokenservice client."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import grpc
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

__all__ = ["TokenServiceClient"]

_Response = TypeVar("_Response")


class TokenServiceClient:
    """A typed client for `tokenservice.v1.TokenService`.

    `target` is a gRPC target such as `"localhost:50051"` or `"tokens.example.com:443"`.
    `token` is sent as `authorization: Bearer <token>` through gRPC call credentials;
    only CreateToken, ListTokens, GetToken and RevokeToken need one.

    Channel security: `channel_credentials` if given (`tls_channel_credentials(ca, cert,
    key)` for your own CA and a client certificate); otherwise local credentials for a
    loopback or Unix-socket target and TLS with the system's roots for anything else.
    `insecure=True` opens a plaintext channel (for a network you trust, such as a mesh
    sidecar) and sends the token as plain metadata. `channel` uses a channel you built;
    the client then neither adds the retry policy nor closes it.

    Every call has a deadline: `timeout` seconds (per call, or the client's default).
    Failures raise `TokenServiceError` subclasses.
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
        channel: grpc.Channel | None = None,
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
                self._channel = grpc.insecure_channel(target, options=opts)
            else:
                creds = channel_credentials or default_channel_credentials(target)
                if token:
                    creds = grpc.composite_channel_credentials(
                        creds, bearer_call_credentials(token)
                    )
                self._channel = grpc.secure_channel(target, creds, options=opts)
        self._stub = pb_grpc.TokenServiceStub(self._channel)

    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    @property
    def timeout(self) -> float:
        return self._timeout

    def _call(
        self,
        method: Any,
        request: Any,
        timeout: float | None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> Any:
        try:
            return method(
                request,
                timeout=self._timeout if timeout is None else timeout,
                metadata=(*self._metadata, *metadata) or None,
            )
        except grpc.RpcError as err:
            raise error_from_rpc_error(err) from err

    def create_token(
        self,
        name: str,
        scopes: Iterable[str],
        expires_at: datetime | timestamp_pb2.Timestamp | None = None,
        *,
        timeout: float | None = None,
    ) -> pb.CreateTokenResponse:
        """Creates a token for the calling user; `.token` is the raw secret, shown once."""
        request = _requests.create_token(name, scopes, expires_at)
        return self._call(self._stub.CreateToken, request, timeout)

    def list_tokens(
        self, page_size: int = 0, page_token: str = "", *, timeout: float | None = None
    ) -> pb.ListTokensResponse:
        """One page of tokens, newest first; an empty `next_page_token` ends the list."""
        request = pb.ListTokensRequest(page_size=page_size, page_token=page_token)
        return self._call(self._stub.ListTokens, request, timeout)

    def iter_tokens(
        self, page_size: int = 0, *, timeout: float | None = None
    ) -> Iterator[pb.ApiToken]:
        """Every token, following page tokens; `timeout` applies to each page."""
        page_token = ""
        while True:
            page = self.list_tokens(page_size, page_token, timeout=timeout)
            yield from page.tokens
            if not page.next_page_token:
                return
            page_token = page.next_page_token

    def get_token(self, token_id: str, *, timeout: float | None = None) -> pb.ApiToken:
        return self._call(self._stub.GetToken, pb.GetTokenRequest(id=token_id), timeout)

    def revoke_token(self, token_id: str, *, timeout: float | None = None) -> pb.ApiToken:
        """Revokes at once; revoking a revoked token returns it unchanged."""
        return self._call(self._stub.RevokeToken, pb.RevokeTokenRequest(id=token_id), timeout)

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
        request = pb.AuthenticateRequest(token=token)
        return self._call(self._stub.Authenticate, request, timeout, metadata)

    def list_scopes(self, *, timeout: float | None = None) -> pb.ListScopesResponse:
        return self._call(self._stub.ListScopes, pb.ListScopesRequest(), timeout)

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
