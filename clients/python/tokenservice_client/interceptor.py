"""Server interceptors that protect a consumer service with tokenservice tokens.

One line on a sync server::

    server = grpc.server(pool, interceptors=[AuthInterceptor("localhost:50051", SCOPES)])

and on an asyncio server::

    server = grpc.aio.server(interceptors=[AsyncAuthInterceptor("localhost:50051", SCOPES)])

where SCOPES maps full method names (`"/pkg.Service/Method"`, or `"/pkg.Service/*"` for
every method of a service) to the scopes a caller's token must all hold; decorating a
servicer method with `@requires_scopes(...)` does the same from the code. The
interceptor reads `authorization: Bearer <token>`, calls Authenticate, and either
aborts with UNAUTHENTICATED / PERMISSION_DENIED or runs the handler with the caller's
`Principal` available through `current_principal()`.

Methods with no declared scopes are refused (fail closed) unless `default_scopes` says
otherwise; `public` methods (by default the health and reflection services) are let
through without a token.

Caching: by default the interceptor asks tokenservice on every call, so a revoked
token stops working at once. `cache=LeaseCache(target, token=VERIFY_TOKEN)`
(`AsyncLeaseCache` for the asyncio interceptor) answers repeated tokens from
memory and keeps revocation immediate: the cache holds a lease from tokenservice,
and every revocation returns only once this process has dropped the token (see
lease.py). A positive `cache_ttl` instead remembers successful authentications for
that many seconds with no lease: it DELAYS REVOCATION (and user disabling, and
scope changes) BY UP TO `cache_ttl` SECONDS for this process. Failures are never
cached.

TLS: given a target string, the interceptor dials tokenservice with
`channel_credentials` if given (for example `tls_channel_credentials(ca_file, cert_file,
key_file)` for a server with your own CA and client certificates), else as
`TokenServiceClient` does by default: local credentials on loopback, TLS with the
system's roots elsewhere. Or pass a client you built.

Throttling: tokenservice throttles failed authentications per client address. With
`forward_client_address=True` (the default) the interceptor names its own caller in
`x-forwarded-for`, which tokenservice honours only from its trusted proxies, so one
bad caller does not get this whole service throttled.

Rate limits: every Authenticate counts one call against the token's rate limit. The
interceptor passes the token's standing on to its caller as the IETF headers, in the
protected call's trailing metadata: `ratelimit-limit`, `ratelimit-remaining` (calls
left in the window after this one) and `ratelimit-reset` (seconds until the token is
fully rested). A token over its limit is refused with RESOURCE_EXHAUSTED, a
`google.rpc.RetryInfo` saying when to retry and the ErrorInfo reason
TOKEN_RATE_LIMITED; until that delay has passed the interceptor refuses the token
itself, without asking tokenservice. Calls answered from the cache (`cache_ttl`) are
not counted and carry no rate limit headers.
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import hashlib
import hmac
import inspect
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import grpc
import grpc.aio
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from .addresses import peer_address
from .aio import AsyncTokenServiceClient
from .client import TokenServiceClient
from .credentials import parse_bearer
from .errors import (
    TOKEN_RATE_LIMITED,
    InvalidArgument,
    RateLimited,
    TokenServiceError,
    Unauthenticated,
)
from .lease import AsyncLeaseCache, LeaseCache
from .principal import _CURRENT, ASK_CACHE_BUDGET, Principal

__all__ = [
    "DEFAULT_PUBLIC_METHODS",
    "AsyncAuthInterceptor",
    "AuthInterceptor",
    "PrincipalCache",
    "requires_scopes",
]

log = logging.getLogger("tokenservice_client")

DEFAULT_PUBLIC_METHODS: tuple[str, ...] = (
    "/grpc.health.v1.Health/*",
    "/grpc.reflection.v1.ServerReflection/*",
    "/grpc.reflection.v1alpha.ServerReflection/*",
)

_SCOPES_ATTR = "__tokenservice_scopes__"
_TOKEN_SYNTAX = re.compile(r"[A-Za-z0-9_]{1,512}")
_UNAUTHENTICATED = "missing or invalid API token"
_OVER_LIMIT = "this token is over its rate limit; retry later"
# The ErrorInfo domain of the refusals passed on from tokenservice.
_ERROR_DOMAIN = "tokenservice.dev"

_F = TypeVar("_F", bound=Callable[..., Any])


def requires_scopes(*scopes: str) -> Callable[[_F], _F]:
    """Declares on a servicer method the scopes its caller's token must all hold."""

    def mark(fn: _F) -> _F:
        setattr(fn, _SCOPES_ATTR, frozenset(scopes))
        return fn

    return mark


class PrincipalCache:
    """A small TTL cache of successful authentications.

    Keyed by an HMAC of the token under a per-process random key, so the raw token is
    never a dictionary key. An entry never outlives the token's own expiry.
    """

    def __init__(
        self,
        ttl: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        self._key = os.urandom(32)
        self._entries: collections.OrderedDict[bytes, tuple[float, Principal]] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()

    def _digest(self, token: str) -> bytes:
        return hmac.new(self._key, token.encode(), hashlib.sha256).digest()

    def get(self, token: str) -> Principal | None:
        key = self._digest(token)
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            deadline, principal = entry
            if now >= deadline or _expired(principal):
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return principal

    def ticket(self) -> int:
        """For the interceptor, which asks every cache for one before Authenticate."""
        return 0

    def put(self, token: str, principal: Principal, ticket: int | None = None) -> None:
        # A cached answer is no Authenticate call: it carries no rate limit standing.
        principal = dataclasses.replace(principal, rate_limit=None)
        key = self._digest(token)
        deadline = self._clock() + self._ttl
        with self._lock:
            self._entries[key] = (deadline, principal)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class _Refusals:
    """Tokens refused for their rate limit, and until when: refused here, not asked again.

    Keyed like PrincipalCache (an HMAC under a per-process key); at most `max_entries`,
    the soonest to end dropped first.
    """

    def __init__(self, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._max_entries = max_entries
        self._clock = clock
        self._key = os.urandom(32)
        self._until: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def _digest(self, token: str) -> bytes:
        return hmac.new(self._key, token.encode(), hashlib.sha256).digest()

    def wait(self, token: str) -> float:
        """Seconds the token must still wait; 0 when it is not refused."""
        if not self._until:  # the usual case: nobody is over a limit
            return 0.0
        key = self._digest(token)
        now = self._clock()
        with self._lock:
            until = self._until.get(key)
            if until is None:
                return 0.0
            if until <= now:
                del self._until[key]
                return 0.0
            return until - now

    def refuse(self, token: str, seconds: float) -> None:
        key = self._digest(token)
        with self._lock:
            self._until[key] = self._clock() + seconds
            if len(self._until) > self._max_entries:
                now = self._clock()
                for stale in [k for k, t in self._until.items() if t <= now]:
                    del self._until[stale]
                while len(self._until) > self._max_entries:
                    del self._until[min(self._until, key=self._until.__getitem__)]


def _expired(principal: Principal) -> bool:
    return principal.expires_at is not None and principal.expires_at <= datetime.now(UTC)


def _bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
    if len(values) != 1 or not isinstance(values[0], str):
        return None
    token = parse_bearer(values[0])
    if token is None or not _TOKEN_SYNTAX.fullmatch(token):
        return None
    return token


class _Denied(Exception):
    """A refusal: a status code and message, and for a rate limit when to retry and why."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after: float | None = None,
                 reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.reason = reason

    def status(self) -> grpc.Status | None:
        """The status with RetryInfo and ErrorInfo details; None when there is no delay."""
        if self.retry_after is None:
            return None
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(1, int(self.retry_after * 1e9)))
        status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=self.message)
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        if self.reason:
            status.details.add().Pack(
                error_details_pb2.ErrorInfo(reason=self.reason, domain=_ERROR_DOMAIN)
            )
        return rpc_status.to_status(status)


def _over_limit(seconds: float) -> _Denied:
    return _Denied(grpc.StatusCode.RESOURCE_EXHAUSTED, _OVER_LIMIT, seconds, TOKEN_RATE_LIMITED)


def _deny_for(err: TokenServiceError) -> _Denied:
    if isinstance(err, Unauthenticated | InvalidArgument):
        return _Denied(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)
    if isinstance(err, RateLimited):
        if err.reason == TOKEN_RATE_LIMITED:
            return _over_limit(err.retry_delay or 1.0)
        return _Denied(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many failed authentications",
                       err.retry_delay, err.reason)
    log.warning("tokenservice Authenticate failed: %s", err.code.name)
    return _Denied(grpc.StatusCode.UNAVAILABLE, "authentication service unavailable")


def _rate_limit_metadata(principal: Principal) -> tuple[tuple[str, str], ...]:
    """The ratelimit-* response metadata for a principal fresh from Authenticate."""
    return principal.rate_limit.headers() if principal.rate_limit is not None else ()


def _keep_trailing(context: Any, ours: tuple[tuple[str, str], ...]) -> None:
    """Puts our metadata back beside whatever trailing metadata the handler set."""
    if not ours:
        return
    current = tuple(context.trailing_metadata() or ())
    if not set(ours) <= set(current):
        context.set_trailing_metadata(current + ours)


class _Policy:
    """Which scopes a method needs: a frozenset, or None for a public method."""

    def __init__(
        self,
        scopes: Mapping[str, Iterable[str]],
        public: Iterable[str],
        default_scopes: Iterable[str] | None,
    ) -> None:
        for method, required in scopes.items():
            if not method.startswith("/") or isinstance(required, str):
                raise ValueError(
                    f"{method!r}: keys are '/package.Service/Method', values lists of scopes"
                )
        self._scopes = {m: frozenset(s) for m, s in scopes.items()}
        self._public = frozenset(public)
        self._default = None if default_scopes is None else frozenset(default_scopes)

    @staticmethod
    def _wildcard(method: str) -> str:
        return method.rsplit("/", 1)[0] + "/*"

    def is_public(self, method: str) -> bool:
        return method in self._public or self._wildcard(method) in self._public

    def required(self, method: str, behavior: Any) -> frozenset[str] | None:
        """The scopes needed, or None when the method has no declared policy."""
        declared = [
            s
            for s in (
                self._scopes.get(method),
                self._scopes.get(self._wildcard(method)),
                getattr(behavior, _SCOPES_ATTR, None),
            )
            if s is not None
        ]
        if not declared:
            return self._default
        return frozenset().union(*declared)


def _behavior_of(handler: grpc.RpcMethodHandler) -> tuple[str, Any]:
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behavior = getattr(handler, kind)
        if behavior is not None:
            return kind, behavior
    raise ValueError("handler has no behavior")


_CONSTRUCTORS = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def _check_scopes(principal: Principal, required: frozenset[str] | None) -> None:
    if required is None:
        raise _Denied(grpc.StatusCode.PERMISSION_DENIED, "method has no scope policy")
    missing = sorted(required - principal.scopes)
    if missing:
        raise _Denied(
            grpc.StatusCode.PERMISSION_DENIED, f"token lacks scope(s): {', '.join(missing)}"
        )


def _peer_ip(context: Any) -> str | None:
    """The caller's IP from `context.peer()` ("ipv4:1.2.3.4:5", "ipv6:%5B::1%5D:5")."""
    return peer_address(context.peer() or "")


def _forwarded(context: Any, forward: bool) -> tuple[tuple[str, str], ...]:
    # tokenservice throttles failed authentications per client address. Naming our
    # caller lets it throttle that caller rather than this whole service; it honours
    # the header only from the proxies it trusts.
    ip = _peer_ip(context) if forward else None
    return (("x-forwarded-for", ip),) if ip else ()


def _auth_timeout(default: float, context: Any) -> float:
    remaining = context.time_remaining()
    if remaining is None:
        return default
    return max(min(default, remaining), 0.001)


ClientT = TypeVar("ClientT", TokenServiceClient, AsyncTokenServiceClient)


@dataclass(frozen=True)
class _Guarded:
    """A method call the interceptor must admit: its handler and what it needs."""

    handler: grpc.RpcMethodHandler
    kind: str
    behavior: Any
    required: frozenset[str] | None
    metadata: Sequence[tuple[str, Any]] | None

    def wrap(self, behavior: Any) -> grpc.RpcMethodHandler:
        """The handler again, running behavior (which admits the caller first)."""
        return _CONSTRUCTORS[self.kind](
            behavior,
            request_deserializer=self.handler.request_deserializer,
            response_serializer=self.handler.response_serializer,
        )


class _BaseAuthInterceptor(Generic[ClientT]):
    """What the sync and asyncio interceptors share; they only do the I/O.

    Here: the policy, the cache, reading the token, the Authenticate call's options,
    turning its answer or its failure into a principal or a refusal.
    """

    def __init__(
        self,
        tokenservice: ClientT | str,
        scopes: Mapping[str, Iterable[str]] | None = None,
        *,
        public: Iterable[str] = DEFAULT_PUBLIC_METHODS,
        default_scopes: Iterable[str] | None = None,
        cache_ttl: float = 0.0,
        cache: PrincipalCache | LeaseCache | AsyncLeaseCache | None = None,
        forward_client_address: bool = True,
        channel_credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self._forward = forward_client_address
        self._given_cache = cache
        self._credentials = channel_credentials
        self._target = tokenservice if isinstance(tokenservice, str) else None
        self._client = self._connect(tokenservice)
        self._policy = _Policy(scopes or {}, public, default_scopes)
        self._cache = (
            cache if cache is not None else PrincipalCache(cache_ttl) if cache_ttl > 0 else None
        )
        self._refusals = _Refusals()

    def _connect(self, tokenservice: ClientT | str) -> ClientT | None:
        """The client to use from now on, or None to open one later."""
        raise NotImplementedError

    def _guard(
        self, handler: grpc.RpcMethodHandler | None, details: grpc.HandlerCallDetails
    ) -> _Guarded | None:
        """None when the call goes straight through (no such method, or a public one)."""
        method: str = details.method  # type: ignore[attr-defined]
        if handler is None or self._policy.is_public(method):
            return None
        kind, behavior = _behavior_of(handler)
        required = self._policy.required(method, behavior)
        metadata = details.invocation_metadata  # type: ignore[attr-defined]
        return _Guarded(handler, kind, behavior, required, metadata)

    def _token(self, metadata: Sequence[tuple[str, Any]] | None) -> str:
        token = _bearer_token(metadata)
        if token is None:
            raise _Denied(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)
        wait = self._refusals.wait(token)
        if wait > 0:
            # Over its rate limit a moment ago: refused here until it may retry.
            raise _over_limit(wait)
        return token

    def _refused(self, token: str, err: TokenServiceError) -> _Denied:
        denied = _deny_for(err)
        if denied.reason == TOKEN_RATE_LIMITED and denied.retry_after:
            self._refusals.refuse(token, denied.retry_after)
        return denied

    def _cached(self, token: str) -> Principal | None:
        return self._cache.get(token) if self._cache is not None else None

    def _ticket(self) -> int | None:
        """Taken before Authenticate: a LeaseCache keeps the answer only if nothing changed."""
        return self._cache.ticket() if self._cache is not None else None

    def _call_options(self, client: ClientT, context: Any) -> dict[str, Any]:
        """Authenticate's deadline (within the caller's) and forwarded address."""
        return {
            "timeout": _auth_timeout(client.timeout, context),
            "metadata": _forwarded(context, self._forward) + (
                ASK_CACHE_BUDGET if isinstance(self._cache, LeaseCache | AsyncLeaseCache) else ()
            ),
        }

    def _keep(self, token: str, principal: Principal, ticket: int | None) -> Principal:
        if self._cache is not None:
            self._cache.put(token, principal, ticket)
        return principal


class AuthInterceptor(_BaseAuthInterceptor[TokenServiceClient], grpc.ServerInterceptor):
    """Protects a sync `grpc.server`; see the module docstring."""

    _client: TokenServiceClient

    def _connect(self, tokenservice: TokenServiceClient | str) -> TokenServiceClient:
        if isinstance(self._given_cache, AsyncLeaseCache):
            raise TypeError("AuthInterceptor takes a LeaseCache; AsyncLeaseCache is for asyncio")
        if isinstance(tokenservice, str):
            return TokenServiceClient(tokenservice, channel_credentials=self._credentials)
        return tokenservice

    def authenticate(self, metadata: Sequence[tuple[str, Any]] | None, context: Any) -> Principal:
        """The caller's principal, or raises _Denied."""
        token = self._token(metadata)
        if (hit := self._cached(token)) is not None:
            return hit
        ticket = self._ticket()
        try:
            principal = self._client.authenticate_principal(
                token, **self._call_options(self._client, context)
            )
        except TokenServiceError as err:
            raise self._refused(token, err) from None
        return self._keep(token, principal, ticket)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        guarded = self._guard(handler, handler_call_details)
        if guarded is None:
            return handler
        behavior = guarded.behavior

        def admit(
            context: grpc.ServicerContext,
        ) -> tuple[contextvars.Context, tuple[tuple[str, str], ...]]:
            try:
                principal = self.authenticate(guarded.metadata, context)
                _check_scopes(principal, guarded.required)
            except _Denied as denied:
                status = denied.status()
                if status is not None:
                    context.abort_with_status(status)
                context.abort(denied.code, denied.message)
            ctx = contextvars.copy_context()
            ctx.run(_CURRENT.set, principal)
            # Set now, so an error from the handler carries them too.
            headers = _rate_limit_metadata(principal)
            if headers:
                context.set_trailing_metadata(headers)
            return ctx, headers

        if guarded.kind in ("unary_unary", "stream_unary"):

            def unary_response(request: Any, context: grpc.ServicerContext) -> Any:
                ctx, headers = admit(context)
                result = ctx.run(behavior, request, context)
                _keep_trailing(context, headers)
                return result

            return guarded.wrap(unary_response)

        def stream_response(request: Any, context: grpc.ServicerContext) -> Any:
            ctx, headers = admit(context)
            responses = ctx.run(behavior, request, context)
            while True:
                try:
                    item = ctx.run(next, responses)
                except StopIteration:
                    _keep_trailing(context, headers)
                    return
                yield item

        return guarded.wrap(stream_response)


class AsyncAuthInterceptor(
    _BaseAuthInterceptor[AsyncTokenServiceClient], grpc.aio.ServerInterceptor
):
    """Protects a `grpc.aio.server`; see the module docstring.

    Given a target string it opens its `AsyncTokenServiceClient` lazily, inside the
    server's event loop.
    """

    def _connect(
        self, tokenservice: AsyncTokenServiceClient | str
    ) -> AsyncTokenServiceClient | None:
        if isinstance(self._given_cache, LeaseCache):
            raise TypeError("AsyncAuthInterceptor takes an AsyncLeaseCache, not a LeaseCache")
        return None if isinstance(tokenservice, str) else tokenservice

    def _tokenservice(self) -> AsyncTokenServiceClient:
        if self._client is None:
            assert self._target is not None
            self._client = AsyncTokenServiceClient(
                self._target, channel_credentials=self._credentials
            )
        return self._client

    async def authenticate(
        self, metadata: Sequence[tuple[str, Any]] | None, context: Any
    ) -> Principal:
        """The caller's principal, or raises _Denied."""
        token = self._token(metadata)
        if (hit := self._cached(token)) is not None:
            return hit
        if isinstance(self._cache, AsyncLeaseCache):
            self._cache.start()  # on the server's loop, at the first call
        client = self._tokenservice()
        ticket = self._ticket()
        try:
            principal = await client.authenticate_principal(
                token, **self._call_options(client, context)
            )
        except TokenServiceError as err:
            raise self._refused(token, err) from None
        return self._keep(token, principal, ticket)

    async def close(self) -> None:
        """Closes the tokenservice channel if this interceptor opened it."""
        if self._client is not None and self._target is not None:
            await self._client.close()
            self._client = None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        guarded = self._guard(handler, handler_call_details)
        if guarded is None:
            return handler
        behavior = guarded.behavior

        async def admit(context: grpc.aio.ServicerContext) -> tuple[tuple[str, str], ...]:
            """Sets the caller's principal for this call; returns the rate limit metadata."""
            try:
                principal = await self.authenticate(guarded.metadata, context)
                _check_scopes(principal, guarded.required)
            except _Denied as denied:
                status = denied.status()
                if status is not None:
                    await context.abort(status.code, status.details, status.trailing_metadata)
                await context.abort(denied.code, denied.message)
            # Each aio RPC runs in its own task, so the variable stays with this call.
            _CURRENT.set(principal)
            headers = _rate_limit_metadata(principal)
            if headers:
                context.set_trailing_metadata(headers)
            return headers

        if guarded.kind in ("unary_unary", "stream_unary"):

            async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
                headers = await admit(context)
                result = behavior(request, context)
                result = await result if inspect.isawaitable(result) else result
                _keep_trailing(context, headers)
                return result

            return guarded.wrap(unary_response)

        if inspect.isasyncgenfunction(behavior):

            async def stream_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
                headers = await admit(context)
                async for item in behavior(request, context):
                    yield item
                _keep_trailing(context, headers)

            return guarded.wrap(stream_response)

        async def write_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
            # A streaming handler written as a coroutine that calls context.write().
            headers = await admit(context)
            result = await behavior(request, context)
            _keep_trailing(context, headers)
            return result

        return guarded.wrap(write_response)
