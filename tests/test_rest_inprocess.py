"""The REST shim calling the gRPC server's handlers in its process, as `tokenservice serve` runs it.

Every test of test_rest.py that takes the `rest` fixture runs here again with
the shim in process (same answers, same errors), beside what only this path
has to prove: `serve` takes it (no gRPC connection of its own), the failure
throttle still counts each HTTP client, a token's rate limit still answers with
its headers, the shim's calls stay bounded, and `tokenservice rest` still dials.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import selectors
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import test_rest
from conftest import TOKENSERVICE, RunningServer, free_port, make_config, start_server
from rest_helpers import Rest, bearer_header, running_rest
from test_rest import assert_error
from test_rest_process import wait_for_http

from tokenservice_server import peers
from tokenservice_server.config import RateLimit
from tokenservice_server.rest import LocalHandlers, RestServer
from tokenservice_server.rest.inprocess import HttpCallContext, RpcFailure, peer_of
from tokenservice_server.tls import SUBJECT_METADATA, peer_subject

SCOPES_PATH = "/tokenservice.v1.TokenService/ListScopes"


def local_handlers(running: RunningServer, **overrides: Any) -> LocalHandlers:
    """The server's own handlers with its own limits, as `serve` hands them to the shim."""
    config = running.config
    options: dict[str, Any] = dict(
        handlers=running.server.unary_handlers,
        max_concurrent=config.grpc_max_concurrent_streams,
        max_message_bytes=config.grpc_max_message_bytes,
    )
    options.update(overrides)
    return LocalHandlers(**options)


@contextmanager
def running_local_rest(running: RunningServer, **overrides: Any) -> Iterator[Rest]:
    """The shim on a free port, in process on the server's loop, with a keep-alive client."""
    server = RestServer(None, "127.0.0.1", 0, local=local_handlers(running, **overrides))
    server.start(running.server.loop)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as client:
            yield Rest(server, client)
    finally:
        server.stop(grace=1)


@pytest.fixture
def rest(ts: RunningServer) -> Iterator[Rest]:
    with running_local_rest(ts) as running:
        yield running


@pytest.fixture
def manager(ts: RunningServer) -> str:
    return ts.manager()


# test_rest.py's tests of the shim's answers, against the in-process shim: pytest
# collects them here too, and the `rest` fixture above takes the place of theirs.
for _name, _test in vars(test_rest).items():
    if _name.startswith("test_") and "rest" in inspect.signature(_test).parameters:
        globals()[_name] = _test


# -- `serve` takes the in-process path; `tokenservice rest` the channel ------------------


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    return inodes


def _tcp_ports(pid: int) -> list[tuple[int, int]]:
    """(local port, remote port) of each TCP socket the process holds open."""
    mine = _socket_inodes(pid)
    ports = []
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            if fields[9] in mine:
                local, remote = fields[1], fields[2]
                ports.append((int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16)))
    return ports


def _unix_paths(pid: int) -> list[str]:
    """The paths of the Unix sockets the process holds open (bound or accepted)."""
    mine = _socket_inodes(pid)
    paths = []
    for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[6] in mine:
            paths.append(fields[7])
    return paths


def _attempt(base: str, address: str, headers: dict[str, str] | None = None) -> int:
    """A failed Authenticate from the HTTP client at `address`."""
    transport = httpx.HTTPTransport(local_address=address)
    with httpx.Client(base_url=base, transport=transport, timeout=30) as client:
        r = client.post("/api/v1/authenticate", json={"token": "tks_bogus"}, headers=headers)
        return r.status_code


def test_serve_answers_rest_without_a_grpc_connection_of_its_own(spawn, database_url) -> None:
    """The shim of `serve` neither dials the gRPC port nor a Unix socket, yet the failure
    throttle still counts each HTTP client, and one client's X-Forwarded-For does not
    let it pass for another."""
    running = spawn(database_url, rest=True, env={
        "TOKENSERVICE_AUTH_FAILURE_BURST": "3",
        "TOKENSERVICE_AUTH_FAILURE_REFILL_PER_SECOND": "0.01",
        "TOKENSERVICE_LOOKUP_FAILURE_BURST": "1000",
    })
    base = f"http://127.0.0.1:{running.http_port}"
    assert wait_for_http(f"{base}/healthz", running.proc).status_code == 200
    statuses = [_attempt(base, "127.0.0.2") for _ in range(5)]
    assert statuses[:3] == [401, 401, 401] and statuses[-1] == 429, statuses
    statuses.append(_attempt(base, "127.0.0.2", {"X-Forwarded-For": "198.51.100.1"}))
    assert statuses[-1] == 429
    assert _attempt(base, "127.0.0.3") == 401
    # Only our test's own health checks ever reached the gRPC port; none came from
    # the process itself, and it holds no Unix socket to reach itself either.
    pid = running.proc.pid
    own_grpc = [ports for ports in _tcp_ports(pid) if ports[1] == running.grpc_port]
    assert own_grpc == []
    assert not [path for path in _unix_paths(pid) if path.endswith(".sock")]
    # The server's own log line for each REST call, as for a gRPC call.
    assert running.stop() == 0
    log = running.log()
    assert log.count('"method": "/tokenservice.v1.TokenService/Authenticate"') == 7
    assert log.count('"status": "RESOURCE_EXHAUSTED"') == statuses.count(429)


def test_rest_command_still_dials_grpc_over_a_channel(ts: RunningServer) -> None:
    """`tokenservice rest --grpc-target` holds a gRPC connection and names each HTTP
    client to the server through it."""
    port = free_port()
    env = {**os.environ, "TOKENSERVICE_BCRYPT_ROUNDS": "4"}
    proc = subprocess.Popen(
        [TOKENSERVICE, "rest", "--grpc-target", ts.target, "--http-port", str(port)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_for_http(f"{base}/healthz", proc).status_code == 200
        token = ts.manager()
        r = httpx.post(f"{base}/api/v1/authenticate", json={"token": token}, timeout=30)
        assert r.status_code == 200 and r.json()["userEmail"], r.text
        grpc_port = int(ts.target.rsplit(":", 1)[1])
        assert [p for p in _tcp_ports(proc.pid) if p[1] == grpc_port]
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


# -- what the in-process call must keep ------------------------------------------------


def test_failures_are_throttled_per_http_client_in_process(database_url) -> None:
    running = start_server(make_config(
        database_url, auth_failure_burst=2, auth_failure_refill_per_second=0.01,
    ))
    try:
        with running_local_rest(running) as rest:
            statuses = [_attempt(rest.base_url, "127.0.0.2") for _ in range(3)]
            assert statuses == [401, 401, 429]
            transport = httpx.HTTPTransport(local_address="127.0.0.2")
            with httpx.Client(base_url=rest.base_url, transport=transport) as client:
                limited = client.post("/api/v1/authenticate", json={"token": "tks_bogus"})
            assert_error(limited, 429, "rate_limited")
            assert int(limited.headers["retry-after"]) >= 1
            assert _attempt(rest.base_url, "127.0.0.3") == 401
    finally:
        running.channel.close()
        running.server.stop(grace=1)


def test_a_tokens_rate_limit_answers_with_its_headers_in_process(database_url) -> None:
    running = start_server(make_config(database_url, rate_limit=RateLimit(2, 36_000.0)))
    try:
        token = running.manager()
        with running_local_rest(running) as rest:
            calls = [rest.client.post("/api/v1/authenticate", json={"token": token})
                     for _ in range(2)]
            for reply, remaining in zip(calls, ("1", "0"), strict=True):
                assert reply.status_code == 200, reply.text
                assert reply.headers["ratelimit-limit"] == "2"
                assert reply.headers["ratelimit-remaining"] == remaining
            over = rest.client.post("/api/v1/authenticate", json={"token": token})
            assert_error(over, 429, "rate_limited")
            assert 36_000 - 10 < int(over.headers["retry-after"]) <= 39_600
            assert "ratelimit-limit" not in over.headers
    finally:
        running.channel.close()
        running.server.stop(grace=1)


def held_scopes(
    ts: RunningServer,
) -> tuple[dict[str, Any], asyncio.Event, threading.Semaphore]:
    """The server's handlers with ListScopes held until `release` is set (on the
    server's loop); `entered` is released once for each call that got in."""
    release = asyncio.Event()
    entered = threading.Semaphore(0)
    real = ts.server.unary_handlers[SCOPES_PATH]

    async def held(message: Any, context: Any) -> Any:
        entered.release()
        await release.wait()
        return await real(message, context)

    return {**ts.server.unary_handlers, SCOPES_PATH: held}, release, entered


def test_calls_in_flight_are_bounded_like_one_grpc_connection(ts: RunningServer) -> None:
    """With one place, another client's call waits for the first, and its deadline runs
    while it waits: it ends 500 like a call a gRPC connection's stream limit held back.
    The same client asking for more than its share is refused at once (429)."""
    handlers, release, entered = held_scopes(ts)
    token = ts.manager()
    with running_local_rest(ts, handlers=handlers, max_concurrent=1) as rest:
        first: dict[str, httpx.Response] = {}
        thread = threading.Thread(
            target=lambda: first.setdefault("r", httpx.get(f"{rest.base_url}/api/v1/scopes",
                                                           timeout=30)))
        thread.start()
        assert entered.acquire(timeout=30)
        busy = rest.client.get("/api/v1/api-tokens", headers=bearer_header(token))
        assert_error(busy, 429, "rate_limited")
        assert busy.headers["Retry-After"] == "1"
        other = httpx.Client(base_url=rest.base_url, transport=httpx.HTTPTransport(
            local_address="127.0.0.2"), timeout=30)
        with other:
            waited = other.get("/api/v1/api-tokens", headers={
                **bearer_header(token), "grpc-timeout": "500m"})
        assert_error(waited, 500, "internal_error")
        ts.server.loop.call_soon_threadsafe(release.set)
        thread.join(30)
        assert first["r"].status_code == 200
        after = rest.client.get("/api/v1/api-tokens", headers=bearer_header(token))
        assert after.status_code == 200, after.text


def test_a_reply_after_the_deadline_is_500(rest: Rest, ts: RunningServer) -> None:
    """A reply ready only after the caller's deadline is not given, however quick the
    method (Authenticate may answer without once waiting): the caller asked for no
    answer that late. (Over a channel grpcio counts deadlines in milliseconds, so
    there a 1 ns deadline sometimes still gets a quick answer.)"""
    token = ts.manager()
    for _ in range(5):
        r = rest.client.post("/api/v1/authenticate", json={"token": token},
                             headers={"grpc-timeout": "1n"})
        assert_error(r, 500, "internal_error")
    r = rest.client.post("/api/v1/authenticate", json={"token": token},
                         headers={"grpc-timeout": "10S"})
    assert r.status_code == 200, r.text


def test_a_request_larger_than_grpc_takes_is_refused_alike_on_both_paths(database_url) -> None:
    """The gRPC server's largest request holds in process too, with the same answer."""
    running = start_server(make_config(database_url, grpc_max_message_bytes=200))
    try:
        token = running.manager()
        body = {"name": "n" * 300, "scopes": ["pass:read"]}
        with running_local_rest(running) as local, running_rest(running.target) as channel:
            answers = [rest.client.post("/api/v1/api-tokens", json=body,
                                        headers=bearer_header(token)) for rest in (local, channel)]
            small = local.client.post("/api/v1/api-tokens", json={**body, "name": "n"},
                                      headers=bearer_header(token))
        assert small.status_code == 201, small.text
        in_process, over_channel = answers
        assert_error(in_process, 429, "rate_limited")
        assert in_process.json() == over_channel.json()
        assert in_process.status_code == over_channel.status_code
    finally:
        running.channel.close()
        running.server.stop(grace=1)


def test_the_client_address_is_the_one_the_forwarded_header_named() -> None:
    """In process the HTTP client is the call's peer; the server works out the same
    address (and throttle bucket) from it as from the x-forwarded-for the shim sent."""
    trusted = peers.TrustedProxies(("127.0.0.1", "::1"))
    for host in ("127.0.0.2", "::1", "2001:db8::7", "::ffff:192.0.2.7", "2001:DB8:0::1"):
        over_channel = peers.client_address("unix:", host, trusted)
        assert peers.client_address(peer_of((host, 5123)), None, trusted) == over_channel
    assert peer_of(None) == "unix:"


def test_the_context_gives_the_verified_subject_and_nothing_unknown() -> None:
    """The certificate subject reads as a TLS caller's; a context method no handler
    uses is an AttributeError (the interceptor answers INTERNAL and logs it)."""
    metadata = (("authorization", "Bearer x"), (SUBJECT_METADATA, "CN=billing"))
    context = HttpCallContext(metadata, "ipv4:127.0.0.2:5000", "CN=billing", 1e18)
    assert peer_subject(context) == "CN=billing"  # type: ignore[arg-type]
    forged = HttpCallContext(((SUBJECT_METADATA, "CN=forged"),), "ipv4:127.0.0.2:5000",
                             None, 1e18)
    assert peer_subject(forged) is None  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        context.set_compression(grpc.Compression.Gzip)  # type: ignore[attr-defined]

    async def abort() -> None:
        context.set_trailing_metadata((("tokenservice-cache-budget", "3"),))
        await context.abort(grpc.StatusCode.NOT_FOUND)

    with pytest.raises(RpcFailure) as failure:
        asyncio.run(abort())
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    assert failure.value.trailing_metadata() == (("tokenservice-cache-budget", "3"),)
    assert context.code() == grpc.StatusCode.NOT_FOUND


def test_a_client_that_hangs_up_gives_its_places_back_at_once(ts: RunningServer) -> None:
    """uvicorn does not cancel a request whose client left: an abandoned call once kept
    its place until its deadline, so one client could fill the house by sending and
    hanging up. Its places now come back as it hangs up, with the call still held."""
    handlers, release, entered = held_scopes(ts)
    local = local_handlers(ts, handlers=handlers, max_concurrent=8)  # 2 a client
    server = RestServer(None, "127.0.0.1", 0, local=local)
    server.start(ts.server.loop)
    try:
        sockets = []
        for _ in range(local.per_client):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(b"GET /api/v1/scopes HTTP/1.1\r\nHost: x\r\n\r\n")
            sockets.append(sock)
        for _ in sockets:
            assert entered.acquire(timeout=30)
        assert local.in_flight("127.0.0.1") == local.per_client
        for sock in sockets:  # hang up, with the calls still held
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        until = time.monotonic() + 30
        while local.in_flight("127.0.0.1") and (
            time.monotonic() < until
        ):
            time.sleep(0.05)
        assert local.in_flight("127.0.0.1") == 0
        ts.server.loop.call_soon_threadsafe(release.set)
        r = httpx.get(f"http://127.0.0.1:{server.port}/api/v1/scopes", timeout=30)
        assert r.status_code == 200
    finally:
        ts.server.loop.call_soon_threadsafe(release.set)
        server.stop(grace=1)


def _raw_flood(port: int, source: str, connections: int, stop: threading.Event,
               answers: list[bytes]) -> None:
    """Bad-token Authenticates from `source` on many keep-alive connections at once,
    each sending its next request as soon as its last one was answered."""
    body = json.dumps({"token": "tks_" + "A" * 40}).encode()
    request = (b"POST /api/v1/authenticate HTTP/1.1\r\nHost: x\r\n"
               b"Content-Type: application/json\r\ngrpc-timeout: 60S\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    with selectors.DefaultSelector() as selector:
        for _ in range(connections):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                            source_address=(source, 0))
            sock.sendall(request)
            selector.register(sock, selectors.EVENT_READ)
        while not stop.is_set():
            for key, _ in selector.select(timeout=0.1):
                sock = key.fileobj
                data = sock.recv(65536)
                if not data:
                    selector.unregister(sock)
                    continue
                if data.startswith(b"HTTP/1.1 "):  # an answer's head (its body may follow)
                    answers.append(data[9:12])
                    sock.sendall(request)
        for key in list(selector.get_map().values()):
            key.fileobj.close()


def test_one_clients_flood_leaves_others_and_health_served(ts: RunningServer) -> None:
    """One address floods Authenticate with bad tokens (throttled, then held back by
    the tarpit) on 400 connections at once. Another client's good token is answered
    meanwhile, and /healthz within its own 2 s deadline (it once queued behind the
    flood for a place and reported the service down): the flood holds at most its
    share, and the rest of it is refused at once."""
    good = ts.manager()
    with running_local_rest(ts) as rest:
        url = f"{rest.base_url}/api/v1/authenticate"
        stop = threading.Event()
        answers: list[bytes] = []
        flooding = threading.Thread(target=_raw_flood, args=(
            rest.server.port, "127.0.0.2", 400, stop, answers), daemon=True)
        flooding.start()
        try:
            while len(answers) < 400 and flooding.is_alive():
                time.sleep(0.05)  # the flood is throttled and tarpitted by now
            with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.3"),
                              timeout=30) as other:
                for _ in range(5):
                    assert other.post(url, json={"token": good}).status_code == 200
                    health = other.get(f"{rest.base_url}/healthz")
                    assert health.status_code == 200, health.text
        finally:
            stop.set()
            flooding.join(30)
        assert set(answers) <= {b"401", b"429"}
