"""The consumer-side auth interceptors against a real tokenservice, on sync and
asyncio servers, using the example passes service's handlers."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import grpc
import grpc.aio
import pytest

import tokenservice_client as tsc
from tokenservice_client import (
    AsyncAuthInterceptor,
    AuthInterceptor,
    Principal,
    PrincipalCache,
    TokenServiceClient,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "consumer" / "server.py"
SERVICE = "/example.passes.v1.PassService"


def _load_example() -> ModuleType:
    name = "passes_example_server"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


ex = _load_example()
pb, pb_grpc = ex.pb, ex.pb_grpc


# The client behaves the same whatever store the server uses, so these tests run the
# real server on SQLite only (the server's own tests cover PostgreSQL).
@pytest.fixture
def database_url(sqlite_database_url: str) -> str:
    return sqlite_database_url


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


@pytest.fixture
def serve(ts_target: str):
    """Starts a sync passes server behind an AuthInterceptor; returns a stub factory."""
    servers: list[grpc.Server] = []
    channels: list[grpc.Channel] = []

    def start(interceptor: AuthInterceptor | None = None, health: bool = False):
        interceptor = interceptor or AuthInterceptor(ts_target, ex.SCOPES)
        # One worker: consecutive calls share a thread, so a leaked principal would show.
        server = grpc.server(futures.ThreadPoolExecutor(1), interceptors=[interceptor])
        pb_grpc.add_PassServiceServicer_to_server(ex.PassServicer(ex.PassStore()), server)
        if health:
            from grpc_health.v1 import health as health_mod
            from grpc_health.v1 import health_pb2_grpc

            health_pb2_grpc.add_HealthServicer_to_server(health_mod.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)

        def stub(token: str | None = None, metadata=()) -> pb_grpc.PassServiceStub:
            creds = grpc.local_channel_credentials()
            if token is not None:
                creds = tsc.token_credentials(token, creds)
            channel = grpc.secure_channel(f"127.0.0.1:{port}", creds)
            channels.append(channel)
            return pb_grpc.PassServiceStub(channel)

        stub.port = port  # type: ignore[attr-defined]
        return stub

    yield start
    for channel in channels:
        channel.close()
    for server in servers:
        server.stop(0)


def test_a_token_with_the_scope_is_let_in_and_its_principal_reaches_the_handler(
    serve, ts_target: str, mint
) -> None:
    token = mint(["pass:read", "pass:create"])
    me = serve()(token).WhoAmI(pb.WhoAmIRequest(), timeout=10)
    expected = TokenServiceClient(ts_target).authenticate(token)
    assert (me.email, me.org_id, me.token_id) == (
        expected.user_email,
        expected.org_id,
        expected.token_id,
    )
    assert list(me.scopes) == ["pass:create", "pass:read"]


def test_missing_malformed_and_unknown_tokens_are_unauthenticated(serve) -> None:
    stub = serve()
    assert _code(lambda: stub().WhoAmI(pb.WhoAmIRequest(), timeout=10)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    streaming = stub().ListPasses
    assert _code(lambda: list(streaming(pb.ListPassesRequest(), timeout=10))) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    call = stub().WhoAmI.with_call
    for header in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer tks_nope!", "tks_abc"):
        code = _code(
            lambda h=header: call(pb.WhoAmIRequest(), metadata=[("authorization", h)], timeout=10)
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED, header
    assert _code(lambda: stub("tks_0000000000000000").WhoAmI(pb.WhoAmIRequest(), timeout=10)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )


def test_a_token_without_the_scope_is_permission_denied(serve, mint) -> None:
    stub = serve()(mint(["pass:read"]))
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreatePass(pb.CreatePassRequest(title="x"), timeout=10)  # @requires_scopes
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "pass:create" in caught.value.details()
    assert list(stub.ListPasses(pb.ListPassesRequest(), timeout=10)) == []


def test_a_revoked_token_stops_at_once_without_a_cache(serve, ts_target: str, mint) -> None:
    manager = TokenServiceClient(ts_target, token=mint(["api_token:manage", "pass:read"]))
    created = manager.create_token("consumer", ["pass:read"])
    stub = serve()(created.token)
    stub.WhoAmI(pb.WhoAmIRequest(), timeout=10)
    manager.revoke_token(created.api_token.id)
    assert _code(lambda: stub.WhoAmI(pb.WhoAmIRequest(), timeout=10)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )


def test_streaming_handlers_see_their_own_principal(serve, mint) -> None:
    stub = serve()
    acme = stub(mint(["pass:read", "pass:create"], org="acme-stream"))
    globex = stub(mint(["pass:read", "pass:create"], org="globex-stream"))
    acme.CreatePass(pb.CreatePassRequest(title="acme card"), timeout=10)
    globex.CreatePass(pb.CreatePassRequest(title="globex card"), timeout=10)
    assert [p.title for p in acme.ListPasses(pb.ListPassesRequest(), timeout=10)] == ["acme card"]
    assert [p.org_id for p in globex.ListPasses(pb.ListPassesRequest(), timeout=10)] == [
        "globex-stream"
    ]


def test_consecutive_calls_on_one_thread_do_not_share_a_principal(serve, mint) -> None:
    stub = serve()
    first, second = mint(["pass:read"]), mint(["pass:read"])
    emails = [stub(t).WhoAmI(pb.WhoAmIRequest(), timeout=10).email for t in (first, second)]
    assert emails[0] != emails[1]


def test_methods_without_declared_scopes_are_refused_unless_a_default_is_given(
    serve, ts_target: str, mint
) -> None:
    token = mint(["pass:read"])
    only_get = {f"{SERVICE}/GetPass": ["pass:read"]}
    closed = serve(AuthInterceptor(ts_target, only_get))(token)
    with pytest.raises(grpc.RpcError) as caught:
        closed.WhoAmI(pb.WhoAmIRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

    opened = serve(AuthInterceptor(ts_target, only_get, default_scopes=()))(token)
    assert opened.WhoAmI(pb.WhoAmIRequest(), timeout=10).email


def test_a_service_wide_entry_covers_every_method(serve, ts_target: str, mint) -> None:
    policy = {f"{SERVICE}/*": ["loyalty:manage"]}
    stub = serve(AuthInterceptor(ts_target, policy))(mint(["pass:read"]))
    assert _code(lambda: stub.WhoAmI(pb.WhoAmIRequest(), timeout=10)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )


def test_health_is_public_by_default(serve) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = serve(health=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{stub.port}")
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()


def test_the_scope_map_is_checked_when_built(ts_target: str) -> None:
    with pytest.raises(ValueError):
        AuthInterceptor(ts_target, {"GetPass": ["pass:read"]})
    with pytest.raises(ValueError):
        AuthInterceptor(ts_target, {f"{SERVICE}/GetPass": "pass:read"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tokenservice_down_is_unavailable_not_unauthenticated(serve, mint) -> None:
    dead = TokenServiceClient(
        f"127.0.0.1:{_free_port()}",
        retry=tsc.RetryPolicy(max_attempts=2, initial_backoff=0.01, max_backoff=0.01),
    )
    stub = serve(AuthInterceptor(dead, ex.SCOPES))(mint(["pass:read"]))
    with pytest.raises(grpc.RpcError) as caught:
        stub.WhoAmI(pb.WhoAmIRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_positive_cache_delays_revocation_by_at_most_its_ttl(
    serve, ts_target: str, mint
) -> None:
    clock = _Clock()
    interceptor = AuthInterceptor(ts_target, ex.SCOPES, cache=PrincipalCache(30, clock=clock))
    manager = TokenServiceClient(ts_target, token=mint(["api_token:manage", "pass:read"]))
    created = manager.create_token("cached", ["pass:read"])
    stub = serve(interceptor)(created.token)
    stub.WhoAmI(pb.WhoAmIRequest(), timeout=10)
    manager.revoke_token(created.api_token.id)

    clock.now += 29
    stub.WhoAmI(pb.WhoAmIRequest(), timeout=10)  # still cached: the documented delay
    clock.now += 2
    assert _code(lambda: stub.WhoAmI(pb.WhoAmIRequest(), timeout=10)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )


def test_the_cache_is_off_by_default_and_bounded() -> None:
    assert AuthInterceptor("127.0.0.1:1", {})._cache is None
    clock = _Clock()
    cache = PrincipalCache(60, max_entries=2, clock=clock)
    soon = datetime.now(UTC) + timedelta(hours=1)
    p = Principal("t", "u", "e@x", "o", frozenset({"pass:read"}), soon)
    for token in ("tks_a", "tks_b", "tks_c"):
        cache.put(token, p)
    assert len(cache) == 2 and cache.get("tks_a") is None and cache.get("tks_c") == p
    expired = Principal("t", "u", "e@x", "o", frozenset(), datetime.now(UTC) - timedelta(1))
    cache.put("tks_d", expired)
    assert cache.get("tks_d") is None  # never outlives the token's own expiry


class _Recorder(grpc.GenericRpcHandler):
    """Forwards to tokenservice, remembering the metadata each call carried."""

    def __init__(self, upstream: str) -> None:
        self._upstream = grpc.insecure_channel(upstream)
        self.seen: list[dict[str, str]] = []
        self._lock = threading.Lock()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method  # type: ignore[attr-defined]

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            with self._lock:
                self.seen.append(dict(context.invocation_metadata()))
            return self._upstream.unary_unary(method)(request, timeout=10)

        return grpc.unary_unary_rpc_method_handler(handle)


@pytest.fixture
def recorder(ts_target: str) -> Iterator[tuple[_Recorder, str]]:
    rec = _Recorder(ts_target)
    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[rec])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield rec, f"127.0.0.1:{port}"
    server.stop(0)


def test_authenticate_names_the_original_caller_for_throttling(serve, recorder, mint) -> None:
    rec, target = recorder
    stub = serve(AuthInterceptor(target, ex.SCOPES))(mint(["pass:read"]))
    stub.WhoAmI(pb.WhoAmIRequest(), timeout=10)
    assert rec.seen[-1].get("x-forwarded-for") == "127.0.0.1"
    assert "authorization" not in rec.seen[-1]  # the caller's token travels only as the argument


# The asyncio interceptor.


def test_async_interceptor_end_to_end(ts_target: str, mint) -> None:
    manager = TokenServiceClient(
        ts_target, token=mint(["api_token:manage", "pass:read", "pass:create"])
    )
    writer = manager.create_token("writer", ["pass:read", "pass:create"])
    reader = manager.create_token("reader", ["pass:read"])

    async def scenario() -> None:
        interceptor = AsyncAuthInterceptor(ts_target, ex.SCOPES)
        server = grpc.aio.server(interceptors=[interceptor])
        pb_grpc.add_PassServiceServicer_to_server(ex.AsyncPassServicer(ex.PassStore()), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()

        def channel(token: str | None) -> grpc.aio.Channel:
            creds = grpc.local_channel_credentials()
            if token:
                creds = tsc.token_credentials(token, creds)
            return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)

        async def code_of(coro) -> grpc.StatusCode:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await coro
            return caught.value.code()

        try:
            async with channel(writer.token) as w, channel(reader.token) as r, channel(None) as a:
                ws, rs, anon = (pb_grpc.PassServiceStub(c) for c in (w, r, a))
                made = await ws.CreatePass(pb.CreatePassRequest(title="gold"), timeout=10)
                assert made.created_by == writer.api_token.created_by_email
                assert (await rs.GetPass(pb.GetPassRequest(id=made.id), timeout=10)).title == "gold"
                titles = [p.title async for p in rs.ListPasses(pb.ListPassesRequest(), timeout=10)]
                assert titles == ["gold"]
                assert (await rs.WhoAmI(pb.WhoAmIRequest(), timeout=10)).token_id == (
                    reader.api_token.id
                )
                denied = rs.CreatePass(pb.CreatePassRequest(title="x"), timeout=10)
                assert await code_of(denied) == grpc.StatusCode.PERMISSION_DENIED
                anonymous = anon.WhoAmI(pb.WhoAmIRequest(), timeout=10)
                assert await code_of(anonymous) == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    [p async for p in anon.ListPasses(pb.ListPassesRequest(), timeout=10)]
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

                manager.revoke_token(reader.api_token.id)
                revoked = rs.WhoAmI(pb.WhoAmIRequest(), timeout=10)
                assert await code_of(revoked) == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await server.stop(0)
            await interceptor.close()

    asyncio.run(scenario())


def test_async_interceptor_cache_delays_revocation_by_at_most_its_ttl(
    ts_target: str, mint
) -> None:
    manager = TokenServiceClient(ts_target, token=mint(["api_token:manage", "pass:read"]))
    created = manager.create_token("cached", ["pass:read"])
    clock = _Clock()

    async def scenario() -> None:
        client = tsc.AsyncTokenServiceClient(ts_target)
        interceptor = AsyncAuthInterceptor(
            client, ex.SCOPES, cache=PrincipalCache(5, clock=clock)
        )
        server = grpc.aio.server(interceptors=[interceptor])
        pb_grpc.add_PassServiceServicer_to_server(ex.AsyncPassServicer(ex.PassStore()), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        creds = tsc.token_credentials(created.token, grpc.local_channel_credentials())
        try:
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as channel:
                stub = pb_grpc.PassServiceStub(channel)
                await stub.WhoAmI(pb.WhoAmIRequest(), timeout=10)
                manager.revoke_token(created.api_token.id)
                await stub.WhoAmI(pb.WhoAmIRequest(), timeout=10)
                clock.now += 6
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.WhoAmI(pb.WhoAmIRequest(), timeout=10)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await server.stop(0)
            await client.close()

    asyncio.run(scenario())


# Rate limits: the token's standing reaches the caller as trailing metadata.


class _TaggingServicer(ex.PassServicer):
    """Sets trailing metadata of its own, as real handlers do."""

    def WhoAmI(self, request, context):  # noqa: N802 - the gRPC method's name
        context.set_trailing_metadata((("x-served-by", "passes"),))
        return super().WhoAmI(request, context)


class _AsyncTaggingServicer(ex.AsyncPassServicer):
    async def WhoAmI(self, request, context):  # noqa: N802
        context.set_trailing_metadata((("x-served-by", "passes"),))
        return await super().WhoAmI(request, context)


def _rate_limit(metadata) -> dict[str, str]:
    return {k: v for k, v in metadata or () if k.startswith("ratelimit-")}


def _slow_limit(ts, raw: str) -> None:
    """1000 calls per 10 hours, the token's own: a call is paid back every 36 s, so
    the counts this test reads do not move with the time it takes."""
    from tokenservice_server import tokens
    from tokenservice_server.db import connection
    from tokenservice_server.models import ApiToken

    lookup_id = tokens.parse(raw, "tks_").lookup_id  # type: ignore[union-attr]
    with connection(ts.server.store.db):
        ApiToken.update(rate_limit_requests=1000, rate_limit_period_us=36_000_000_000).where(
            ApiToken.lookup_id == lookup_id).execute()


def test_rate_limit_metadata_rides_beside_the_handler_s_own_and_on_its_errors(
    ts, ts_target: str, mint
) -> None:
    """Each call counts one against the token's limit, and every answer says so."""
    token = mint(["pass:read"])
    _slow_limit(ts, token)
    interceptor = AuthInterceptor(ts_target, ex.SCOPES)
    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[interceptor])
    pb_grpc.add_PassServiceServicer_to_server(_TaggingServicer(ex.PassStore()), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    creds = tsc.token_credentials(token, grpc.local_channel_credentials())
    try:
        with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
            stub = pb_grpc.PassServiceStub(channel)
            _, call = stub.WhoAmI.with_call(pb.WhoAmIRequest(), timeout=10)
            trailing = dict(call.trailing_metadata())
            assert trailing["x-served-by"] == "passes"
            headers = _rate_limit(call.trailing_metadata())
            # Every call counted leaves the window 10 hours on, and at most a slice more.
            assert 35_990 < int(headers.pop("ratelimit-reset")) <= 39_600
            assert headers == {"ratelimit-limit": "1000", "ratelimit-remaining": "999"}
            with pytest.raises(grpc.RpcError) as missing:
                stub.GetPass(pb.GetPassRequest(id="nope"), timeout=10)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            assert _rate_limit(missing.value.trailing_metadata())["ratelimit-remaining"] == "998"
            stream = stub.ListPasses(pb.ListPassesRequest(), timeout=10)
            assert list(stream) == []
            assert _rate_limit(stream.trailing_metadata())["ratelimit-remaining"] == "997"
    finally:
        server.stop(0)


def test_async_rate_limit_metadata_and_no_standing_from_the_cache(
    ts, ts_target: str, mint
) -> None:
    token = mint(["pass:read"])
    _slow_limit(ts, token)

    async def scenario() -> None:
        plain = AsyncAuthInterceptor(ts_target, ex.SCOPES)
        cached = AsyncAuthInterceptor(ts_target, ex.SCOPES, cache_ttl=60)
        servers, ports = [], []
        for interceptor in (plain, cached):
            server = grpc.aio.server(interceptors=[interceptor])
            pb_grpc.add_PassServiceServicer_to_server(
                _AsyncTaggingServicer(ex.PassStore()), server)
            ports.append(server.add_insecure_port("127.0.0.1:0"))
            await server.start()
            servers.append(server)
        creds = tsc.token_credentials(token, grpc.local_channel_credentials())
        try:
            async with grpc.aio.secure_channel(f"127.0.0.1:{ports[0]}", creds) as a, \
                    grpc.aio.secure_channel(f"127.0.0.1:{ports[1]}", creds) as b:
                call = pb_grpc.PassServiceStub(a).WhoAmI(pb.WhoAmIRequest(), timeout=10)
                await call
                trailing = await call.trailing_metadata()
                assert dict(trailing)["x-served-by"] == "passes"
                assert _rate_limit(trailing)["ratelimit-remaining"] == "999"
                stream = pb_grpc.PassServiceStub(a).ListPasses(pb.ListPassesRequest(), timeout=10)
                assert [p async for p in stream] == []
                assert _rate_limit(await stream.trailing_metadata())["ratelimit-limit"] == "1000"

                # Behind a cache: the first call asks tokenservice and is counted; the
                # cached ones are not, and claim no standing.
                stub = pb_grpc.PassServiceStub(b)
                first = stub.WhoAmI(pb.WhoAmIRequest(), timeout=10)
                await first
                assert _rate_limit(await first.trailing_metadata())["ratelimit-remaining"] == "997"
                for _ in range(3):
                    again = stub.WhoAmI(pb.WhoAmIRequest(), timeout=10)
                    await again
                    assert _rate_limit(await again.trailing_metadata()) == {}
                assert TokenServiceClient(ts_target).authenticate(token).rate_limit.remaining == 996
        finally:
            for server in servers:
                await server.stop(0)
            await plain.close()
            await cached.close()

    asyncio.run(scenario())
