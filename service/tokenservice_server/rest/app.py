"""The ASGI app: matches a route, transcodes, calls the gRPC method, renders.

Where the call goes: under `tokenservice serve` (one process) straight to the
gRPC server's own wrapped handler for the method, awaited on the server's event
loop with a small context built from the HTTP request (inprocess.py); otherwise
(`tokenservice rest --grpc-target`, the supervisor of `serve --workers N`) over
a real grpc.aio channel. Either way the caller gets the same answer, the same
error mapping, and the server the same log line and metrics.

A plain ASGI callable using starlette's Request/Response, rather than
starlette's router, because the routes come from descriptors and the router's
405 lists only the methods of the first route that matched a path; here 404,
405 and its Allow header are decided over all routes at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from tokenservice_client import parse_bearer

from .. import console, metrics
from ..health import DEPENDENCIES, DEPENDENCY_PREFIX
from ..tls import SUBJECT_METADATA
from . import apidocs
from .errors import ApiError, from_rpc_error, internal_error, not_found, unauthorized
from .headers import RESPONSE_HEADERS
from .inprocess import HEALTH_CHECK, LocalHandlers, RpcFailure, peer_of
from .openapi import build_openapi
from .routes import Route, build_routes
from .transcode import build_request, parse_json, render_response

log = logging.getLogger("tokenservice.rest")

T = TypeVar("T")

MAX_BODY_BYTES = 64 * 1024
# The deadline passed on to gRPC when the caller sends none, and the most a
# caller may ask for with a `grpc-timeout` header (gRPC's own format: 5S, 250m).
DEFAULT_DEADLINE_S = 10.0
MAX_DEADLINE_S = 60.0
HEALTH_DEADLINE_S = 2.0

_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_TIMEOUT = re.compile(r"([0-9]{1,8})([HMSmun])")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")

# Every response says no-store: most carry token data, and a uniform header
# cannot be forgotten on a new route.
_COMMON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def default_services() -> list[ServiceDescriptor]:
    from tokenservice.v1 import token_service_pb2

    return list(token_service_pb2.DESCRIPTOR.services_by_name.values())


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    response = Response(content, status_code=status, media_type="application/json")
    for key, value in {**_COMMON_HEADERS, **(headers or {})}.items():
        response.headers[key] = value
    return response


def error_response(error: ApiError) -> Response:
    return json_response(error.status, error.body(), error.headers)


def _bearer_metadata(value: str) -> str:
    """`authorization` metadata from the header: a bearer token, as gRPC expects it.

    The scheme is matched case-insensitively (by `parse_bearer`, as the gRPC server
    does); anything else is forwarded as sent, and the server refuses it.
    """
    value = value.strip()
    if not _PRINTABLE_ASCII.fullmatch(value):
        raise unauthorized("The Authorization header is malformed.")
    token = parse_bearer(value)
    return value if token is None else "Bearer " + token


def parse_deadline(header: str | None) -> float:
    if not header:
        return DEFAULT_DEADLINE_S
    m = _TIMEOUT.fullmatch(header.strip())
    if m is None:
        raise ApiError(
            422,
            "validation_error",
            "The grpc-timeout header is malformed.",
            [{"field": "grpc-timeout", "description": "must be like 5S or 250m"}],
        )
    seconds = int(m.group(1)) * _TIMEOUT_UNITS[m.group(2)]
    return min(seconds, MAX_DEADLINE_S)


def _client_subject(request: Request) -> str | None:
    """The HTTPS client's certificate subject: set by the shim's own HTTPS protocol
    from the verified client certificate, never from a request header."""
    return request.scope.get("extensions", {}).get("tls", {}).get("client_cert_name")


def _client_host(request: Request) -> str:
    """Whose share of the in-process places a call takes: the client's address
    (every client of a Unix socket is one)."""
    return request.client.host if request.client is not None and request.client.host else "unix:"


async def _disconnected(receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    """Returns once the HTTP client has gone (the body, if any, was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request: Request, call: Awaitable[T]) -> T:
    """The call's result, or ClientDisconnect once the HTTP client has gone: uvicorn
    does not cancel an app whose client left, and an abandoned call would keep its
    place (and its client's share) until its deadline."""
    task = asyncio.ensure_future(call)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        raise ClientDisconnect()
    return task.result()


def _is_json(content_type: str) -> bool:
    media, _, params = content_type.partition(";")
    media = media.strip().lower()
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        return False
    for param in params.split(";"):
        key, _, val = param.partition("=")
        if key.strip().lower() == "charset" and val.strip().strip('"').lower() not in (
            "utf-8",
            "utf8",
        ):
            return False
    return True


class RestApp:
    """The REST/JSON shim as an ASGI application.

    With `local` (the gRPC server's handlers, in this process and on this event
    loop) it calls them directly and opens no channel; else it dials grpc_target.
    """

    def __init__(
        self,
        grpc_target: str | None,
        *,
        services: Iterable[ServiceDescriptor] | None = None,
        trusted_health: bool = True,
        default_deadline: float = DEFAULT_DEADLINE_S,
        channel_credentials: grpc.ChannelCredentials | None = None,
        local: LocalHandlers | None = None,
        metrics: bool = True,
    ) -> None:
        if local is None and not grpc_target:
            raise ValueError("the REST shim needs a gRPC target or the server's handlers")
        self.grpc_target = grpc_target
        self.local = local
        self.metrics = metrics  # off: /metrics is no route (TOKENSERVICE_METRICS=0)
        self.channel_credentials = channel_credentials
        self.services = list(services) if services is not None else default_services()
        self.routes: list[Route] = build_routes(self.services)
        self.trusted_health = trusted_health
        self.default_deadline = default_deadline
        self.openapi = build_openapi(self.routes)
        self._openapi_bytes = json.dumps(self.openapi).encode("utf-8")
        self._channel: grpc.aio.Channel | None = None
        self._calls: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}

    # -- lifecycle ---------------------------------------------------------

    def _get_channel(self) -> grpc.aio.Channel:
        """The channel, created on first use inside the serving event loop."""
        assert self.grpc_target, "an in-process shim has no channel"
        if self._channel is None:
            # round_robin: a target may list several addresses (the Unix sockets of
            # `serve --workers N`), and calls then spread over all of them.
            options = [("grpc.enable_retries", 1), ("grpc.lb_policy_name", "round_robin")]
            if self.channel_credentials is None:
                self._channel = grpc.aio.insecure_channel(self.grpc_target, options=options)
            else:
                self._channel = grpc.aio.secure_channel(
                    self.grpc_target, self.channel_credentials, options=options
                )
            self._calls = {}
        return self._channel

    async def aclose(self, grace: float | None = None) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close(grace)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    if self.local is None:
                        self._get_channel()
                except Exception as exc:  # pragma: no cover - bad target syntax
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose(grace=1.0)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # no websockets: the server closes the connection
        if console.is_console_path(scope["path"]):
            await console.app(scope, receive, send)  # the web console's static files
            return
        if apidocs.is_docs_path(scope["path"]):
            await apidocs.app(scope, receive, send)  # Swagger UI on /openapi.json
            return
        request = Request(scope, receive)
        try:
            response = await self._dispatch(request)
        except ApiError as error:
            response = error_response(error)
        except ClientDisconnect:
            return  # gone before its body arrived (or closed for being too slow)
        except Exception:
            # Logged without the request: it may carry a token.
            log.exception("unexpected failure in the REST shim")
            response = error_response(internal_error())
        await response(scope, receive, send)

    # -- dispatch ----------------------------------------------------------

    async def _dispatch(self, request: Request) -> Response:
        raw = request.scope.get("raw_path")
        path = raw.decode("latin-1") if raw else request.scope["path"]
        path = path.split("?", 1)[0]
        method = request.method
        if path == "/metrics" and not self.metrics:
            raise not_found("No route matches this path: metrics are off.")
        if path in ("/healthz", "/openapi.json", "/metrics"):
            if method != "GET":
                raise self._method_not_allowed(["GET"])
            if path == "/healthz":
                return await self._health(request)
            if path == "/metrics":
                page, content_type = metrics.render()
                return Response(page, headers={"Content-Type": content_type})
            response = Response(self._openapi_bytes, media_type="application/json")
            response.headers.update(_COMMON_HEADERS)
            return response
        matches = [(r, v) for r in self.routes if (v := r.template.match(path)) is not None]
        if not matches:
            raise not_found("No route matches this path.")
        for route, values in matches:
            if route.http_method == method:
                return await self._call(route, values, request)
        raise self._method_not_allowed([r.http_method for r, _ in matches])

    @staticmethod
    def _method_not_allowed(methods: list[str]) -> ApiError:
        allow = ", ".join(sorted(set(methods)))
        return ApiError(
            405,
            "method_not_allowed",
            "This method is not allowed on this path.",
            headers={"Allow": allow},
        )

    async def _read_body(self, request: Request) -> bytes:
        too_large = ApiError(
            413, "validation_error", f"The request body is larger than {MAX_BODY_BYTES} bytes."
        )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def _parse_body(self, request: Request, whole_message: bool) -> Any:
        content_type = request.headers.get("content-type")
        raw = await self._read_body(request)
        if content_type is None and not raw:
            return None
        if content_type is None or not _is_json(content_type):
            raise ApiError(
                415, "validation_error", "The request body must be application/json."
            )
        if not raw.strip():
            return None
        value = parse_json(raw)
        if whole_message and not isinstance(value, dict):
            raise ApiError(422, "validation_error", "The request body must be a JSON object.")
        return value

    def _metadata(self, request: Request, forward_client: bool = True) -> list[tuple[str, str]]:
        """The call's metadata; over a channel it names the HTTP client in
        x-forwarded-for (in process the client is the call's peer instead)."""
        metadata = []
        authorization = request.headers.getlist("authorization")
        if len(authorization) > 1:
            raise unauthorized("Send a single Authorization header.")
        if authorization:
            metadata.append(("authorization", _bearer_metadata(authorization[0])))
        if forward_client and request.client is not None and request.client.host:
            metadata.append(("x-forwarded-for", request.client.host))
        subject = _client_subject(request)
        if subject:
            metadata.append((SUBJECT_METADATA, subject))
        return metadata

    def _callable(self, route: Route) -> grpc.aio.UnaryUnaryMultiCallable:
        channel = self._get_channel()
        call = self._calls.get(route.rpc_path)
        if call is None:
            call = channel.unary_unary(
                route.rpc_path,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=route.response_class.FromString,
            )
            self._calls[route.rpc_path] = call
        return call

    async def _call(
        self, route: Route, values: dict[tuple[str, ...], str], request: Request
    ) -> Response:
        local = self.local
        metadata = self._metadata(request, forward_client=local is None)
        deadline = (
            parse_deadline(request.headers.get("grpc-timeout"))
            if "grpc-timeout" in request.headers
            else self.default_deadline
        )
        query = list(request.query_params.multi_items())
        body = await self._parse_body(request, route.body == "*") if route.body else None
        message = build_request(route, values, query, body)
        try:
            if local is not None:
                reply = await _unless_gone(request, local.call(
                    route.rpc_path, message, tuple(metadata), peer_of(request.client),
                    _client_subject(request), deadline, _client_host(request),
                ))
            else:
                reply = await self._callable(route)(message, metadata=metadata, timeout=deadline)
        except (grpc.aio.AioRpcError, RpcFailure) as err:
            body_field = route.body if route.body != "*" else ""
            raise from_rpc_error(err, route.method.input_type, body_field) from None
        headers = RESPONSE_HEADERS.get(reply.DESCRIPTOR.full_name)
        return json_response(route.success_status, render_response(route, reply),
                             headers(reply) if headers else None)

    def _health_check(
        self, request: Request
    ) -> Callable[[health_pb2.HealthCheckRequest], Awaitable[health_pb2.HealthCheckResponse]]:
        """grpc.health.v1 Check: the server's own handler in process, else over the channel."""
        local = self.local
        if local is None:
            stub = health_pb2_grpc.HealthStub(self._get_channel())
            return lambda message: stub.Check(message, timeout=HEALTH_DEADLINE_S)
        peer = peer_of(request.client)
        return lambda message: local.call(
            HEALTH_CHECK, message, (), peer, None, HEALTH_DEADLINE_S
        )

    async def _health(self, request: Request) -> Response:
        """200 while the service serves; the body names each dependency's state."""
        check = self._health_check(request)
        names = [""] if self.trusted_health else [s.full_name for s in self.services]
        serving = health_pb2.HealthCheckResponse.SERVING
        dependencies: dict[str, str] = {}
        try:
            statuses = []
            for name in names:
                reply = await check(health_pb2.HealthCheckRequest(service=name))
                statuses.append(reply.status)
            for name in DEPENDENCIES:
                try:
                    reply = await check(
                        health_pb2.HealthCheckRequest(service=DEPENDENCY_PREFIX + name)
                    )
                except (grpc.aio.AioRpcError, RpcFailure) as err:
                    if err.code() == grpc.StatusCode.NOT_FOUND:
                        continue  # not configured (no Redis), or an older server
                    raise
                dependencies[name] = "up" if reply.status == serving else "down"
        except (grpc.aio.AioRpcError, RpcFailure):
            statuses = [None]
        if all(status == serving for status in statuses):
            return json_response(200, {"status": "SERVING", "dependencies": dependencies})
        down = [name for name, state in dependencies.items() if state == "down"]
        message = "The service is not serving."
        if down:
            message = f"The service is not serving: {', '.join(down)} down."
        return error_response(ApiError(503, "unavailable", message))


def create_app(
    grpc_target: str | None, *, trusted_health: bool = True, **options: Any
) -> RestApp:
    """The REST shim as an ASGI app proxying to the gRPC server at grpc_target, or,
    with `local=`, calling the server's handlers in this process.

    The gRPC channel is opened in the serving event loop (at lifespan start-up,
    or on the first request) and closed at lifespan shutdown.
    """
    return RestApp(grpc_target, trusted_health=trusted_health, **options)
