"""The gRPC face: a thin servicer translating protos to service calls, and one interceptor.

The interceptor does the cross-cutting work once per RPC: a database
connection, the caller's authentication for the methods that need it, the
mapping of domain errors to status codes with rich details, and one log line.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent import futures
from contextlib import AbstractContextManager
from datetime import UTC
from typing import Any

import grpc
import grpc.aio
from google.protobuf import duration_pb2, json_format
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice.v1 import token_service_pb2_grpc as pb_grpc
from tokenservice_client import parse_bearer

from . import narrowing, peers
from .errors import (
    CALLER_UNAUTHENTICATED,
    TOKEN_RATE_LIMITED,
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
    Unavailable,
)
from .leases import Event, Invalidation, LeaseHub, Subscriber
from .logs import rpc_log
from .metrics import RpcMetrics
from .peers import TrustedProxies
from .policy import SERVICE_NAME, Caller, caller_for
from .service import TokenService, client_subject, wants_cache_budget
from .tls import peer_subject
from .values import (
    UPDATABLE,
    AuditEvent,
    CachedUse,
    Narrowed,
    Principal,
    RateLimit,
    TokenInfo,
    TokenState,
    to_micros,
)

log = logging.getLogger("tokenservice.rpc")

_PREFIX = f"/{SERVICE_NAME}/"
ERROR_DOMAIN = "tokenservice.dev"
# A lease cache sends it with Authenticate to ask for a cache budget, and gets
# the budget back under the same name in the trailing metadata.
CACHE_BUDGET_METADATA = "tokenservice-cache-budget"
# WatchTokenEvents refusals (RESOURCE_EXHAUSTED): the caller's token holds all
# the streams it may, or a stream left too many events unread.
WATCH_STREAMS_EXHAUSTED = "WATCH_STREAMS_EXHAUSTED"
WATCH_STREAM_BEHIND = "WATCH_STREAM_BEHIND"
WATCH_RETRY_SECONDS = 1.0

_caller: contextvars.ContextVar[Principal] = contextvars.ContextVar("caller")
_token_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("token_id", default=None)
# A stream's caller token as presented: the stream checks it again after an
# Invalidate that names it.
_raw_caller: contextvars.ContextVar[str] = contextvars.ContextVar("raw_caller")
# The caller's address, worked out on the event loop's thread before a method runs
# on a worker: a grpc.aio call's context is not for other threads, and once the
# call has ended (a deadline passed) touching it there can crash the process.
_client_address: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "client_address", default=None
)

_CODES: dict[type[DomainError], tuple[int, grpc.StatusCode]] = {
    InvalidArgument: (code_pb2.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT),
    Unauthenticated: (code_pb2.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED),
    PermissionDenied: (code_pb2.PERMISSION_DENIED, grpc.StatusCode.PERMISSION_DENIED),
    NotFound: (code_pb2.NOT_FOUND, grpc.StatusCode.NOT_FOUND),
    AlreadyExists: (code_pb2.ALREADY_EXISTS, grpc.StatusCode.ALREADY_EXISTS),
    FailedPrecondition: (code_pb2.FAILED_PRECONDITION, grpc.StatusCode.FAILED_PRECONDITION),
    RateLimited: (code_pb2.RESOURCE_EXHAUSTED, grpc.StatusCode.RESOURCE_EXHAUSTED),
    Unavailable: (code_pb2.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE),
}


def status_for(error: DomainError) -> grpc.Status:
    """A grpc.Status with the google.rpc details AIP-193 asks for."""
    code = _CODES[type(error)][0]
    status = status_pb2.Status(code=code, message=error.message)
    if isinstance(error, InvalidArgument) and error.violations:
        detail = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                for f, d in error.violations
            ]
        )
        status.details.add().Pack(detail)
    elif isinstance(error, RateLimited):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(1, int(error.retry_after * 1e9)))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        status.details.add().Pack(
            error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN)
        )
    return rpc_status.to_status(status)


def client_address(context: grpc.ServicerContext, trusted: TrustedProxies) -> str:
    """The caller's address; a trusted proxy (the REST shim) may name the real client."""
    forwarded = None
    for key, value in context.invocation_metadata():
        if key == "x-forwarded-for":
            forwarded = value
    return peers.client_address(context.peer(), forwarded, trusted)


def bearer_token(context: grpc.ServicerContext) -> str | None:
    """The caller's bearer token; None when there is none, or more than one (which
    one would count is not the caller's to leave open: REST refuses two as well)."""
    found = [value for key, value in context.invocation_metadata() if key == "authorization"]
    return parse_bearer(found[0]) if len(found) == 1 else None


class _Malformed:
    """Stands in for a request whose bytes did not parse as the method's message."""


MALFORMED = _Malformed()


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The method's request parser, answering MALFORMED instead of raising.

    grpc.aio parses the request before any interceptor code runs, and a parser
    error there becomes UNKNOWN with the exception's text and an ERROR log line,
    unthrottled. Parsing to a sentinel hands the bad request to the wrapped
    handler, which refuses it like any other bad call.
    """
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # DecodeError; whatever else a parser may raise on hostile bytes
            return MALFORMED

    return parse


AUTHENTICATE = _PREFIX + "Authenticate"
# Anonymous methods whose throttled callers are tarpitted.
TARPITTED = frozenset({AUTHENTICATE, _PREFIX + "ReportLeakedTokens"})
# A throttled client's refusal is held back this long at most: a flooder with a
# fixed number of calls in flight then sends only a few calls a second, and a
# waiting call costs the event loop nothing.
TARPIT_MAX_SECONDS = 1.0


class RpcInterceptor(grpc.aio.ServerInterceptor):
    """The per-RPC work, for the grpc.aio server.

    Coroutine handlers (Authenticate, health, reflection) run on the event loop
    and manage their own work (TokenService.aauthenticate decides what runs
    where). The other methods are synchronous code (transactions, a bcrypt hash
    for CreateToken): they run whole on `blocking`, a thread pool, with one
    connection and their caller.
    """

    def __init__(
        self,
        service: TokenService,
        connection: Callable[[], AbstractContextManager[None]],
        trusted_proxies: tuple[str, ...],
        blocking: futures.Executor | None = None,
        metrics: RpcMetrics | None = None,
        settle: Callable[[Sequence[Narrowed]], Awaitable[None]] | None = None,
        claim: Callable[[Narrowed], None] | None = None,
    ) -> None:
        self._service = service
        # Awaited after a call's rules have returned and before it answers, with
        # the narrowing changes the call committed; `claim` is told each one
        # before it commits (narrowing.py).
        self._settle = settle
        self._claim = claim
        self._metrics = metrics
        self._connection = connection
        self._trusted = TrustedProxies(trusted_proxies)
        self._blocking = blocking
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        self._handles: dict[str, Callable[..., Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(details)
        if handler is None:
            return handler
        if handler.stream_stream is not None and method.startswith(_PREFIX):
            wrapped = handler._replace(
                stream_stream=self._wrap_stream(method, handler.stream_stream)
            )
            self._wrapped[method] = wrapped
            return wrapped
        if handler.unary_unary is None:
            return handler
        wrapped = handler._replace(
            unary_unary=self.unary(method, handler.unary_unary),
            request_deserializer=_tolerant(handler.request_deserializer),
        )
        self._wrapped[method] = wrapped
        return wrapped

    def unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        """The wrapped handler of a unary method, made once: the closure the server runs
        for `method`, which the REST shim in this process calls too (rest/inprocess.py),
        so both faces share one log line, metrics, caller policy and error mapping."""
        handle = self._handles.get(method)
        if handle is None:
            handle = self._handles[method] = self._wrap(method, behavior)
        return handle

    def _wrap(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        ours = method.startswith(_PREFIX)
        # A method of ours missing from the policy table needs a caller: the safe default.
        needs_caller = ours and caller_for(method) is not Caller.ANONYMOUS
        tarpit = method in TARPITTED
        is_async = inspect.iscoroutinefunction(behavior)
        # Authenticate never narrows anything: its hot path skips the collector.
        collects = ours and is_async and method != AUTHENTICATE
        service, connection = self._service, self._connection
        trusted, blocking, metrics = self._trusted, self._blocking, self._metrics
        settle, claim = self._settle, self._claim

        def run_blocking(
            request: Any, context: Any, raw: str | None, address: str, narrowed: list[Narrowed]
        ) -> Any:
            """A synchronous method, whole, on a worker thread (in a copy of the context)."""
            narrowing.collect(narrowed, claim)
            with connection():
                if needs_caller:
                    try:
                        if raw is None:
                            raise Unauthenticated(CALLER_UNAUTHENTICATED)
                        # A management call's caller: not counted against its rate limit.
                        caller = service.authenticate(raw, address, limited=False)
                    except Unauthenticated:
                        raise Unauthenticated(CALLER_UNAUTHENTICATED) from None
                    _token_id.set(caller.token_id)
                    _caller.set(caller)
                return behavior(request, context)

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            outcome = "ok"
            token_ctx = _token_id.set(None)
            try:
                if request is MALFORMED:
                    service.refuse_malformed(lambda: client_address(context, trusted))
                if not ours or is_async:
                    # Health, reflection and Authenticate: coroutines that manage
                    # their own (short) database use.
                    if not collects:
                        return await behavior(request, context)
                    # A coroutine method of ours that may narrow tokens: its store
                    # calls run in copies of this context (as aauthenticate's do),
                    # so their events land here.
                    narrowed_async: list[Narrowed] = []
                    collecting = narrowing.collect(narrowed_async, claim)
                    client_subject.set(peer_subject(context) or "")  # for the audit log
                    try:
                        return await behavior(request, context)
                    finally:
                        narrowing.stop(collecting)
                        if narrowed_async and settle is not None:
                            await settle(narrowed_async)
                raw = bearer_token(context) if needs_caller else None
                address = client_address(context, trusted)
                ctx = contextvars.copy_context()
                ctx.run(_client_address.set, address)
                ctx.run(client_subject.set, peer_subject(context) or "")  # for the audit log
                loop = asyncio.get_running_loop()
                narrowed: list[Narrowed] = []
                try:
                    return await loop.run_in_executor(
                        blocking, ctx.run, run_blocking, request, context, raw, address,
                        narrowed,
                    )
                finally:
                    _token_id.set(ctx.get(_token_id))
                    if narrowed and settle is not None:
                        # Committed: no consumer may use a cached answer for these
                        # tokens once this call has answered.
                        await settle(narrowed)
            except DomainError as error:
                code = _CODES[type(error)][1]
                outcome = _outcome(error)
                if error.__cause__ is not None:
                    log.warning("database error",
                                extra={"method": method, "error": _describe(error.__cause__)})
                if (
                    (tarpit or request is MALFORMED)
                    and isinstance(error, RateLimited)
                    and error.client_throttled
                ):
                    # A tarpit: a throttled client's refusal waits (costing the loop
                    # nothing), and the wait does not count as refill time for it.
                    hold = min(error.retry_after, TARPIT_MAX_SECONDS)
                    await asyncio.sleep(hold)
                    service.tarpitted(lambda: client_address(context, trusted), hold)
                status = status_for(error)
                await context.abort(status.code, status.details, status.trailing_metadata)
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except NotImplementedError:
                code = grpc.StatusCode.UNIMPLEMENTED
                await context.abort(code, "this method is not implemented by this server")
            except Exception as error:
                if isinstance(error, grpc.RpcError):
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                code = grpc.StatusCode.INTERNAL
                log.error("unexpected error", exc_info=True, extra={"method": method})
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            finally:
                elapsed = time.perf_counter() - start
                if metrics is not None:
                    metrics.rpc(method, code.name, elapsed)
                    if tarpit and code is not grpc.StatusCode.CANCELLED:
                        metrics.authentication(outcome)
                if rpc_log.enabled():
                    rpc_log.rpc(method, code.name, round(elapsed * 1000, 3), _token_id.get())
                _token_id.reset(token_ctx)

        return handle


    def _wrap_stream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        """A streaming method of ours (a coroutine writing with context.write()): the caller
        authenticated once, when the stream opens."""
        needs_caller = caller_for(method) is not Caller.ANONYMOUS
        service, trusted, metrics = self._service, self._trusted, self._metrics

        async def handle(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            # Not a context variable: a stream may be finished from another task.
            token_id: str | None = None
            try:
                if needs_caller:
                    raw = bearer_token(context)
                    try:
                        if raw is None:
                            raise Unauthenticated(CALLER_UNAUTHENTICATED)
                        caller = await service.aauthenticate(
                            raw, lambda: client_address(context, trusted)
                        )
                    except Unauthenticated:
                        raise Unauthenticated(CALLER_UNAUTHENTICATED) from None
                    token_id = caller.token_id
                    _caller.set(caller)
                    _raw_caller.set(raw)
                await behavior(requests, context)  # it writes with context.write()
            except DomainError as error:
                code = _CODES[type(error)][1]
                status = status_for(error)
                await context.abort(status.code, status.details, status.trailing_metadata)
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                log.error("unexpected error", exc_info=True, extra={"method": method})
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            finally:
                elapsed = time.perf_counter() - start
                if metrics is not None:
                    metrics.rpc(method, code.name, elapsed)
                if rpc_log.enabled():
                    rpc_log.rpc(method, code.name, round(elapsed * 1000, 3), token_id)

        return handle


def _outcome(error: DomainError) -> str:
    """The tokenservice_authentications_total label for a refused Authenticate."""
    if isinstance(error, Unauthenticated):
        return error.reason
    if isinstance(error, RateLimited):
        return "rate_limited" if error.reason == TOKEN_RATE_LIMITED else "throttled"
    return "invalid"


def _describe(error: BaseException) -> str:
    """The error's type and first line, for operators; never sent to callers."""
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {first[0] if first else ''}"


def _ts(message: Any, value: Any) -> None:
    if value is not None:
        message.FromDatetime(value)


_STATES = {
    TokenState.ACTIVE: pb.ApiToken.ACTIVE,
    TokenState.EXPIRED: pb.ApiToken.EXPIRED,
    TokenState.REVOKED: pb.ApiToken.REVOKED,
}
_STATE_FILTERS = {number: state for state, number in _STATES.items()}


def _grace_micros(grace: duration_pb2.Duration) -> int:
    """A grace period in microseconds, rounded away from zero, so a nanosecond past
    seven days, or before zero, is outside the range rather than on its edge."""
    seconds, nanos = grace.seconds, grace.nanos
    if (
        abs(nanos) >= 1_000_000_000
        or (seconds > 0 and nanos < 0)
        or (seconds < 0 and nanos > 0)
    ):
        raise InvalidArgument([("grace_period", "is not a valid duration")])
    whole = seconds * 1_000_000
    if nanos >= 0:
        return whole + (nanos + 999) // 1000
    return whole - (-nanos + 999) // 1000


def token_pb(info: TokenInfo) -> pb.ApiToken:
    message = pb.ApiToken(
        id=info.id,
        name=info.name,
        token_prefix=info.token_prefix,
        scopes=info.scopes,
        created_by_email=info.created_by_email,
        org_id=info.org_id,
        state=_STATES[info.state],
        rotated_from_id=info.rotated_from_id or "",
        replaced_by_id=info.replaced_by_id or "",
        parent_id=info.parent_id or "",
    )
    _ts(message.expires_at, info.expires_at)
    _ts(message.last_used_at, info.last_used_at)
    _ts(message.revoked_at, info.revoked_at)
    _ts(message.created_at, info.created_at)
    if info.rate_limit is not None:
        message.rate_limit.requests = info.rate_limit.requests
        message.rate_limit.period.FromMicroseconds(info.rate_limit.period_us)
    return message


def audit_event_pb(event: AuditEvent) -> pb.AuditEvent:
    message = pb.AuditEvent(
        id=event.id,
        action=event.action,
        org_id=event.org_id,
        actor_user_id=event.actor_user_id,
        actor_email=event.actor_email,
        actor_token_id=event.actor_token_id,
        token_id=event.token_id,
        client_address=event.client_address,
    )
    message.time.FromDatetime(event.time)
    json_format.ParseDict(event.details, message.details)
    return message


def _timestamp(message: Any, field: str) -> Any:
    """A request's Timestamp field as an aware datetime, None when unset."""
    if not message.HasField(field):
        return None
    try:
        return getattr(message, field).ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument([(field, "is not a valid timestamp")]) from None


def _rate_limit(message: Any) -> RateLimit | None:
    """A request's RateLimit, None when unset; an unset period is zero (refused)."""
    if not message.HasField("rate_limit"):
        return None
    limit = message.rate_limit
    return RateLimit(limit.requests, limit.period.ToMicroseconds())


class TokenServiceServicer(pb_grpc.TokenServiceServicer):
    """Protos in, service calls, protos out. Nothing else lives here."""

    def __init__(
        self,
        service: TokenService,
        trusted_proxies: tuple[str, ...],
        hub: LeaseHub | None = None,
    ) -> None:
        self._service = service
        self._trusted = TrustedProxies(trusted_proxies)
        self._hub = hub

    def _client(self, context: Any) -> Any:
        """The caller's address, for the audit log: as the interceptor worked it out
        for a method on a worker thread, else computed when an event needs it."""
        address = _client_address.get()
        if address is not None:
            return address
        trusted = self._trusted
        return lambda: client_address(context, trusted)

    def CreateToken(self, request: pb.CreateTokenRequest, context: Any) -> pb.CreateTokenResponse:
        created = self._service.create_token(
            _caller.get(), request.name, list(request.scopes),
            _timestamp(request, "expires_at"), _rate_limit(request), self._client(context),
        )
        _token_id.set(created.info.id)
        return pb.CreateTokenResponse(token=created.raw, api_token=token_pb(created.info))

    def ListTokens(self, request: pb.ListTokensRequest, context: Any) -> pb.ListTokensResponse:
        if request.state and request.state not in _STATE_FILTERS:
            # An open enum carries any number: one the proto does not define is
            # no filter at all, not "every state".
            raise InvalidArgument([("state", f"{request.state} is not a token state")])
        page = self._service.list_tokens(
            _caller.get(), request.page_size, request.page_token,
            _STATE_FILTERS.get(request.state), _timestamp(request, "not_used_since"),
        )
        return pb.ListTokensResponse(
            tokens=[token_pb(t) for t in page.tokens], next_page_token=page.next_page_token
        )

    def GetToken(self, request: pb.GetTokenRequest, context: Any) -> pb.ApiToken:
        return token_pb(self._service.get_token(_caller.get(), request.id))

    def RevokeToken(self, request: pb.RevokeTokenRequest, context: Any) -> pb.ApiToken:
        return token_pb(self._service.revoke_token(
            _caller.get(), request.id, request.revoke_children, self._client(context)
        ))

    def RotateToken(self, request: pb.RotateTokenRequest, context: Any) -> pb.RotateTokenResponse:
        rotated = self._service.rotate_token(
            _caller.get(), request.id, _grace_micros(request.grace_period),
            self._client(context),
        )
        _token_id.set(rotated.info.id)
        return pb.RotateTokenResponse(
            token=rotated.raw,
            api_token=token_pb(rotated.info),
            previous=token_pb(rotated.previous),
        )

    def UpdateToken(self, request: pb.UpdateTokenRequest, context: Any) -> pb.ApiToken:
        token = request.api_token
        paths = list(request.update_mask.paths)
        if not paths:
            # AIP-134: no mask means every field the request sets (output-only
            # and identifying fields are not changes).
            paths = [f.name for f, _ in token.ListFields() if f.name in UPDATABLE]
        elif "*" in paths:
            paths = sorted(UPDATABLE)
        changes: dict[str, Any] = {}
        for path in paths:
            if path == "name":
                changes[path] = token.name
            elif path == "scopes":
                changes[path] = list(token.scopes)
            elif path == "expires_at":
                changes[path] = _timestamp(token, "expires_at")
            elif path == "rate_limit":
                changes[path] = _rate_limit(token)
            else:
                changes[path] = None  # the rules refuse it, naming it
        return token_pb(self._service.update_token(
            _caller.get(), token.id, changes, self._client(context)
        ))

    def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: Any
    ) -> pb.ListAuditEventsResponse:
        page = self._service.list_audit_events(
            _caller.get(), request.page_size, request.page_token, request.token_id,
            request.action,
        )
        return pb.ListAuditEventsResponse(
            events=[audit_event_pb(e) for e in page.events],
            next_page_token=page.next_page_token,
        )

    def ReportLeakedTokens(
        self, request: pb.ReportLeakedTokensRequest, context: Any
    ) -> pb.ReportLeakedTokensResponse:
        results = self._service.report_leaked_tokens(
            list(request.tokens), request.source, self._client(context)
        )
        return pb.ReportLeakedTokensResponse(results=[
            pb.LeakResult(token_prefix=r.token_prefix, revoked=r.revoked) for r in results
        ])

    async def Authenticate(
        self, request: pb.AuthenticateRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthenticateResponse:
        trusted = self._trusted
        asks = _asks_cache_budget(context)
        if asks:
            wants_cache_budget.set(True)
        principal = await self._service.aauthenticate(
            request.token, lambda: client_address(context, trusted)
        )
        _token_id.set(principal.token_id)
        response = pb.AuthenticateResponse(
            token_id=principal.token_id,
            user_id=principal.user_id,
            user_email=principal.email,
            org_id=principal.org_id,
            scopes=principal.scopes,
        )
        _ts(response.expires_at, principal.expires_at)
        if principal.rate_limit is not None:
            limit = principal.rate_limit
            status = response.rate_limit
            status.limit = limit.limit
            status.remaining = limit.remaining
            # Seconds and nanos from micros: FromDatetime costs several times more.
            status.reset_time.seconds, micros = divmod(limit.reset_at_us, 1_000_000)
            status.reset_time.nanos = micros * 1000
            if asks:  # the uses a lease cache may answer from memory (see the proto)
                context.set_trailing_metadata(
                    ((CACHE_BUDGET_METADATA, str(limit.cache_budget)),)
                )
        return response

    def ListScopes(self, request: pb.ListScopesRequest, context: Any) -> pb.ListScopesResponse:
        return pb.ListScopesResponse(
            scopes=[
                pb.Scope(name=s.name, description=s.description, api_only=s.api_only)
                for s in self._service.catalog
            ]
        )

    async def WatchTokenEvents(
        self, requests: AsyncIterator[pb.WatchTokenEventsRequest], context: Any
    ) -> None:
        # context.write() rather than yield: with a thousand streams, one
        # async-generator hop less per event is a measurable share of the fan-out.
        caller = _caller.get()
        self._service.require_verify(caller)
        if self._hub is None:
            raise Unavailable("this server does not stream token events")
        hub = self._hub
        sub = hub.subscribe(caller.token_id)
        if sub is None:
            raise RateLimited(
                "this token holds as many token-event streams as it may on this server",
                WATCH_RETRY_SECONDS, WATCH_STREAMS_EXHAUSTED,
            )
        loop = asyncio.get_running_loop()
        watch = _Watch(_raw_caller.get())
        reader = asyncio.create_task(self._read_watch(requests, sub, watch))
        # The caller's token expires: no Invalidate says so, so the stream ends then.
        expired = False
        expiry: asyncio.TimerHandle | None = None
        if caller.expires_at is not None:
            left = (to_micros(caller.expires_at) - self._service.clock()) / 1_000_000

            def expire() -> None:
                nonlocal expired
                expired = True
                sub.outbox.put_nowait(None)

            expiry = loop.call_later(max(0.0, left), expire)
        try:
            while (event := await sub.next_event()) is not None:
                await self._recheck_watcher(watch)
                if isinstance(event, Invalidation) and (
                    caller.token_id in event.token_ids or caller.user_id in event.user_ids
                ):
                    watch.recheck = True
                try:
                    await context.write(_event_pb(event))
                except Exception as error:  # noqa: BLE001 - grpc's own ExecuteBatchError
                    # The consumer went away while the write waited on its window
                    # (routine, and any verify holder can do it at will): the
                    # stream is over, nothing to log at error.
                    log.debug("token events stream gone mid-write",
                              extra={"error": type(error).__name__})
                    return
            if watch.failure is not None:
                raise watch.failure
            if expired:
                raise Unauthenticated(CALLER_UNAUTHENTICATED)
            if sub.behind:
                raise RateLimited(
                    "this stream left too many events unread and was ended",
                    WATCH_RETRY_SECONDS, WATCH_STREAM_BEHIND,
                )
        finally:
            if expiry is not None:
                expiry.cancel()
            reader.cancel()
            hub.unsubscribe(sub, dropped=watch.said_goodbye)

    async def _recheck_watcher(self, watch: _Watch) -> None:
        """Raises if the watcher's token, named by an Invalidate since the last check,
        may no longer watch (or if an earlier check said so)."""
        async with watch.checking:
            if watch.failure is not None:
                raise watch.failure
            if not watch.recheck:
                return
            try:
                again = await self._service.aauthenticate(watch.raw)
                self._service.require_verify(again)
            except Unauthenticated:
                watch.failure = Unauthenticated(CALLER_UNAUTHENTICATED)
                raise watch.failure from None
            except DomainError as error:
                watch.failure = error
                raise
            watch.recheck = False

    async def _read_watch(
        self,
        requests: AsyncIterator[pb.WatchTokenEventsRequest],
        sub: Subscriber,
        watch: _Watch,
    ) -> None:
        """Applies the consumer's Renew, Ack and UsageReport messages; ends the stream after."""
        pace = sub.pace
        try:
            async for request in requests:
                kind = request.WhichOneof("kind")
                if kind == "ack":
                    sub.ack(request.ack.sequence)
                    continue
                await self._recheck_watcher(watch)
                if kind == "renew":
                    sub.renew(request.renew.id)
                elif kind == "usage":
                    wait = pace.delay(len(request.usage.uses))
                    if wait > 0:
                        await asyncio.sleep(wait)
                    now = self._service.clock()
                    await self._service.arecord_cached_uses(
                        [CachedUse(u.token_id, u.count, _micros_or(u, now))
                         for u in request.usage.uses]
                    )
            watch.said_goodbye = True
        except DomainError as error:
            if isinstance(error, Unauthenticated):
                error = Unauthenticated(CALLER_UNAUTHENTICATED)
            if watch.failure is None:
                watch.failure = error
        except grpc.RpcError:
            pass  # the stream broke: the writer side ends too
        finally:
            # The consumer closed its side, or failed: end ours.
            sub.outbox.put_nowait(None)


def _asks_cache_budget(context: Any) -> bool:
    return any(key == CACHE_BUDGET_METADATA for key, _ in context.invocation_metadata() or ())


class _Watch:
    """What a WatchTokenEvents stream's writer and reader share."""

    def __init__(self, raw: str) -> None:
        self.raw = raw  # the caller's token as presented, to check it again
        # An Invalidate named the caller's own token or user: check the token
        # before anything more is sent on the stream or taken from it (an Ack
        # is always taken: it only lets a change return sooner).
        self.recheck = False
        self.checking = asyncio.Lock()
        self.failure: DomainError | None = None  # the stream ends with it
        # The consumer ended its side: it has dropped its cache.
        self.said_goodbye = False


def _micros_or(use: pb.TokenUse, default: int) -> int:
    if not use.HasField("last_used_at"):
        return default
    try:
        return to_micros(use.last_used_at.ToDatetime(tzinfo=UTC))
    except (ValueError, OverflowError):
        return default


def _event_pb(event: Event) -> pb.TokenEvent:
    if isinstance(event, Invalidation):
        return pb.TokenEvent(
            sequence=event.sequence,
            invalidate=pb.Invalidate(token_ids=event.token_ids, user_ids=event.user_ids),
        )
    lease = pb.Lease(renew_id=event.renew_id)
    lease.duration.FromNanoseconds(int(event.duration * 1e9))
    return pb.TokenEvent(sequence=event.sequence, lease=lease)
