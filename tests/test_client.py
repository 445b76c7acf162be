"""The Python client against a real tokenservice: every RPC, typed errors, retries,
deadlines and call credentials, in the sync and the asyncio flavour."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta

import grpc
import pytest

import tokenservice_client as tsc
from tokenservice_client import (
    AsyncTokenServiceClient,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RetryPolicy,
    TokenServiceClient,
    Unauthenticated,
)

MANAGE = ["api_token:manage", "pass:read", "pass:create"]


# The client behaves the same whatever store the server uses, so these tests run the
# real server on SQLite only (the server's own tests cover PostgreSQL).
@pytest.fixture
def database_url(sqlite_database_url: str) -> str:
    return sqlite_database_url


@pytest.fixture
def manager(ts_target: str, mint) -> Iterator[TokenServiceClient]:
    with TokenServiceClient(ts_target, token=mint(MANAGE)) as client:
        yield client


def test_list_scopes_reports_the_catalog_with_api_only_flags(ts_target: str) -> None:
    with TokenServiceClient(ts_target) as client:
        scopes = {s.name: s for s in client.list_scopes().scopes}
    assert scopes["api_token:manage"].api_only
    assert not scopes["pass:read"].api_only
    assert "invoice.view" in scopes


def test_create_list_get_revoke_authenticate_round_trip(manager: TokenServiceClient) -> None:
    expires = datetime.now(UTC) + timedelta(days=30)
    created = manager.create_token("POS Integration", ["pass:read"], expires_at=expires)
    assert created.token.startswith("tks_")
    assert created.api_token.token_prefix == created.token[:12]
    assert list(created.api_token.scopes) == ["pass:read"]
    assert created.api_token.expires_at.ToDatetime(tzinfo=UTC) == expires.replace(
        microsecond=created.api_token.expires_at.ToDatetime(tzinfo=UTC).microsecond
    )

    who = manager.authenticate(created.token)
    assert who.token_id == created.api_token.id
    assert list(who.scopes) == ["pass:read"]

    listed = manager.list_tokens()
    assert listed.tokens[0].id == created.api_token.id  # newest first
    assert all(not t.HasField("revoked_at") for t in listed.tokens)

    assert manager.get_token(created.api_token.id).name == "POS Integration"

    revoked = manager.revoke_token(created.api_token.id)
    assert revoked.HasField("revoked_at")
    with pytest.raises(Unauthenticated):
        manager.authenticate(created.token)
    again = manager.revoke_token(created.api_token.id)
    assert again.revoked_at == revoked.revoked_at


def test_iter_tokens_follows_page_tokens(manager: TokenServiceClient) -> None:
    ids = {manager.create_token(f"t{i}", ["pass:read"]).api_token.id for i in range(3)}
    seen = [t.id for t in manager.iter_tokens(page_size=1)]
    assert ids <= set(seen)
    assert len(seen) == len(set(seen)) == 4  # the bootstrap token and three more


def test_invalid_argument_carries_field_violations(manager: TokenServiceClient) -> None:
    with pytest.raises(InvalidArgument) as caught:
        manager.create_token("", ["no:such-scope"])
    err = caught.value
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT
    assert {"name", "scopes"} <= set(err.fields)
    assert all(v.description for v in err.field_violations)
    assert isinstance(err.__cause__, grpc.RpcError)


def test_status_codes_map_to_exception_classes(ts_target: str, mint) -> None:
    with TokenServiceClient(ts_target) as anonymous, pytest.raises(Unauthenticated) as e1:
        anonymous.list_tokens()
    assert e1.value.code is grpc.StatusCode.UNAUTHENTICATED

    reader = TokenServiceClient(ts_target, token=mint(["pass:read"]))
    with reader, pytest.raises(PermissionDenied):
        reader.create_token("x", ["pass:read"])

    manager = TokenServiceClient(ts_target, token=mint(MANAGE))
    with manager, pytest.raises(NotFound):
        manager.get_token(str(uuid.uuid4()))

    with TokenServiceClient(ts_target) as anonymous, pytest.raises(Unauthenticated):
        anonymous.authenticate("tks_not_a_real_token")


def test_every_error_is_a_token_service_error(ts_target: str) -> None:
    with TokenServiceClient(ts_target) as client, pytest.raises(tsc.TokenServiceError):
        client.authenticate("garbage")


def test_naive_expiry_and_a_bare_string_of_scopes_are_refused_before_sending(
    manager: TokenServiceClient,
) -> None:
    with pytest.raises(ValueError, match="timezone"):
        manager.create_token("x", ["pass:read"], expires_at=datetime(2030, 1, 1))
    with pytest.raises(TypeError):
        manager.create_token("x", "pass:read")


def test_insecure_channel_sends_the_token_as_metadata(ts_target: str, mint) -> None:
    with TokenServiceClient(ts_target, token=mint(MANAGE), insecure=True) as client:
        assert client.create_token("plain", ["pass:read"]).token


def test_rotating_credentials_ask_for_the_token_on_every_call(
    ts_target: str, mint, manager: TokenServiceClient
) -> None:
    current = {"token": mint(MANAGE)}
    creds = tsc.rotating_token_credentials(
        lambda: current["token"], grpc.local_channel_credentials()
    )
    with TokenServiceClient(ts_target, channel_credentials=creds) as client:
        client.list_tokens()
        current["token"] = "tks_rotated_to_something_invalid"
        with pytest.raises(Unauthenticated):
            client.list_tokens()


# Retries and deadlines, through a real gRPC proxy in front of the real server.


class _Proxy(grpc.GenericRpcHandler):
    """Forwards raw bytes to tokenservice after failing the first `failures` calls
    with UNAVAILABLE; with `hang=True` it never answers."""

    def __init__(self, upstream: str, failures: int = 0, hang: bool = False) -> None:
        self._upstream = grpc.insecure_channel(upstream)
        self._failures = failures
        self._hang = hang
        self._lock = threading.Lock()
        self.calls = 0

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method  # type: ignore[attr-defined]

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            with self._lock:
                self.calls += 1
                attempt = self.calls
            if self._hang:
                done = threading.Event()
                context.add_callback(done.set)
                done.wait()
                context.abort(grpc.StatusCode.CANCELLED, "gave up")
            if attempt <= self._failures:
                context.abort(grpc.StatusCode.UNAVAILABLE, "flaky proxy")
            md = [(k, v) for k, v in context.invocation_metadata() if k == "authorization"]
            try:
                return self._upstream.unary_unary(method)(request, metadata=md, timeout=10)
            except grpc.RpcError as err:
                context.abort(err.code(), err.details())

        return grpc.unary_unary_rpc_method_handler(handle)


@pytest.fixture
def proxy_factory(ts_target: str):
    servers: list[grpc.Server] = []

    def start(**kwargs) -> tuple[_Proxy, str]:
        proxy = _Proxy(ts_target, **kwargs)
        server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[proxy])
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return proxy, f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


def test_unavailable_is_retried_by_the_channel_policy(proxy_factory) -> None:
    proxy, target = proxy_factory(failures=2)
    with TokenServiceClient(target) as client:
        assert client.list_scopes().scopes
    assert proxy.calls == 3


def test_without_a_retry_policy_unavailable_surfaces_at_once(proxy_factory) -> None:
    proxy, target = proxy_factory(failures=2)
    with TokenServiceClient(target, retry=None) as client, pytest.raises(tsc.Unavailable):
        client.list_scopes()
    assert proxy.calls == 1


def test_retries_stop_at_max_attempts(proxy_factory) -> None:
    proxy, target = proxy_factory(failures=10)
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)
    with TokenServiceClient(target, retry=policy) as client, pytest.raises(tsc.Unavailable):
        client.list_scopes()
    assert proxy.calls == 3


def test_every_call_has_a_deadline(proxy_factory) -> None:
    _, target = proxy_factory(hang=True)
    with TokenServiceClient(target, timeout=0.3) as client:
        with pytest.raises(tsc.DeadlineExceeded):
            client.list_scopes()  # the client's default deadline
        with pytest.raises(tsc.DeadlineExceeded):
            client.authenticate("tks_x", timeout=0.1)  # a per-call deadline


def test_service_config_names_the_service_and_unavailable() -> None:
    import json

    config = json.loads(tsc.service_config(tsc.DEFAULT_RETRY))
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "tokenservice.v1.TokenService"}]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert "retryPolicy" not in json.loads(tsc.service_config(None))["methodConfig"][0]


def test_local_targets_get_local_credentials_others_tls() -> None:
    from tokenservice_client.channel import is_local_target

    for target in ("localhost:1", "127.0.0.1:1", "[::1]:1", "dns:///localhost:1", "unix:/s"):
        assert is_local_target(target), target
    for target in ("tokens.example.com:443", "10.0.0.1:50051", "[2001:db8::1]:1"):
        assert not is_local_target(target), target


# The asyncio flavour.


def test_async_client_round_trip(ts_target: str, mint) -> None:
    token = mint(MANAGE)

    async def scenario() -> None:
        async with AsyncTokenServiceClient(ts_target, token=token) as client:
            assert (await client.list_scopes()).scopes
            created = await client.create_token("async", ["pass:read"])
            assert (await client.authenticate(created.token)).token_id == created.api_token.id
            assert (await client.get_token(created.api_token.id)).name == "async"
            ids = [t.id async for t in client.iter_tokens(page_size=1)]
            assert created.api_token.id in ids
            assert (await client.revoke_token(created.api_token.id)).HasField("revoked_at")
            with pytest.raises(Unauthenticated):
                await client.authenticate(created.token)
            with pytest.raises(InvalidArgument) as caught:
                await client.create_token("", ["pass:read"])
            assert caught.value.fields == ["name"]
            with pytest.raises(NotFound):
                await client.get_token(str(uuid.uuid4()))

    asyncio.run(scenario())


def test_async_client_retries_and_deadlines(proxy_factory) -> None:
    flaky, flaky_target = proxy_factory(failures=2)
    _, hung_target = proxy_factory(hang=True)

    async def scenario() -> None:
        async with AsyncTokenServiceClient(flaky_target) as client:
            assert (await client.list_scopes()).scopes
        async with AsyncTokenServiceClient(hung_target, timeout=0.2) as client:
            with pytest.raises(tsc.DeadlineExceeded):
                await client.list_scopes()

    asyncio.run(scenario())
    assert flaky.calls == 3
