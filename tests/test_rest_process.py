"""The shim as deployed: `serve` with REST, `tokenservice rest` alone, drain on stop."""

from __future__ import annotations

import collections
import os
import resource
import signal
import socket
import subprocess
import threading

import grpc
import httpx
import pytest
from conftest import TOKENSERVICE, free_port
from rest_helpers import bearer_header, running_rest

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice.v1 import token_service_pb2_grpc as pb_grpc


def wait_for_http(url: str, proc: subprocess.Popen | None = None) -> httpx.Response:
    """GETs url until something answers; bounded by attempts, not by a clock."""
    last: Exception | None = None
    for _ in range(300):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode}")
        try:
            return httpx.get(url, timeout=5)
        except httpx.TransportError as exc:
            last = exc
            threading.Event().wait(0.05)
    raise AssertionError(f"{url} never answered: {last!r}")


def test_serve_runs_the_shim_beside_grpc(spawn, database_url: str) -> None:
    running = spawn(database_url, rest=True)
    base = f"http://127.0.0.1:{running.http_port}"
    assert wait_for_http(f"{base}/healthz", running.proc).status_code == 200
    r = httpx.post(f"{base}/api/v1/authenticate", json={"token": "tks_nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert running.stop(signal.SIGTERM) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_rest_command_fronts_a_grpc_server_and_stops_on_signal(ts, sig) -> None:
    token = ts.manager()
    port = free_port()
    env = {**os.environ, "TOKENSERVICE_BCRYPT_ROUNDS": "4"}
    proc = subprocess.Popen(
        [TOKENSERVICE, "rest", "--grpc-target", ts.target, "--http-port", str(port)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_for_http(f"{base}/healthz", proc).status_code == 200
        r = httpx.get(f"{base}/api/v1/api-tokens", headers=bearer_header(token))
        assert r.status_code == 200 and len(r.json()["tokens"]) == 1
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
        output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
        assert token not in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stop_lets_an_in_flight_request_finish(ts) -> None:
    """A request whose body is still arriving when stop() begins is answered in full."""
    token = ts.manager()
    release = threading.Event()
    result: dict[str, httpx.Response] = {}

    def body():
        yield b'{"name": "drained", '
        release.wait(30)
        yield b'"scopes": ["pass:read"]}'

    with running_rest(ts.target) as rest:
        server = rest.server
        state = server._server.server_state  # uvicorn's own bookkeeping

        def send() -> None:
            result["r"] = rest.client.post(
                "/api/v1/api-tokens", content=body(),
                headers={**bearer_header(token), "Content-Type": "application/json"},
            )

        sender = threading.Thread(target=send)
        sender.start()
        for _ in range(600):
            if state.tasks:
                break
            threading.Event().wait(0.01)
        assert state.tasks, "the request never reached the shim"
        stopper = threading.Thread(target=server.stop, kwargs={"grace": 10})
        stopper.start()
        for _ in range(600):  # the listener closes first...
            try:
                httpx.get(f"{rest.base_url}/healthz", timeout=1)
            except httpx.TransportError:
                break
            threading.Event().wait(0.01)
        else:
            raise AssertionError("the shim kept accepting connections while stopping")
        release.set()  # ...then the in-flight request completes
        sender.join(30)
        stopper.join(30)
    assert result["r"].status_code == 201, result["r"].text
    assert result["r"].json()["apiToken"]["name"] == "drained"


def _answer(sock: socket.socket) -> bytes:
    """The status line the server sent before it closed (b"reset" if it reset the
    connection instead); the socket's timeout bounds a failure."""
    data = b""
    with sock:
        try:
            while chunk := sock.recv(4096):
                data += chunk
        except ConnectionResetError:
            return b"reset"
    return data.split(b"\r\n", 1)[0]


@pytest.mark.slow
def test_half_open_rest_connections_cannot_take_grpc_down(tmp_path) -> None:
    """Under a common file limit (256 here), more half-sent HTTP requests than the
    shim's cap: the extra connections are refused at once, gRPC clients on new
    connections authenticate throughout, the stalled ones are closed at the header
    timeout, and REST serves again."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TOKENSERVICE_")},
           "TOKENSERVICE_DATABASE_URL": f"sqlite:///{tmp_path / 'ts.db'}",
           "TOKENSERVICE_BCRYPT_ROUNDS": "4",
           "TOKENSERVICE_REST_MAX_CONNECTIONS": "64",
           "TOKENSERVICE_REST_HEADER_TIMEOUT_SECONDS": "3",
           "TOKENSERVICE_REST_IDLE_TIMEOUT_SECONDS": "3"}
    for args in (("user", "add", "--email", "a@acme.test", "--org", "acme",
                  "--permissions", "pass:read"),
                 ("token", "create", "--email", "a@acme.test", "--name", "t",
                  "--scopes", "pass:read")):
        done = subprocess.run([TOKENSERVICE, *args], env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
    raw = done.stdout.strip().splitlines()[-1]
    grpc_port, http_port = free_port(), free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [TOKENSERVICE, "serve", "--grpc-port", str(grpc_port), "--http-port", str(http_port)],
        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)),
    )
    log.close()
    stalled: list[socket.socket] = []
    try:
        base = f"http://127.0.0.1:{http_port}"
        assert wait_for_http(f"{base}/healthz", proc).status_code == 200
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", http_port), timeout=60)
            sock.sendall(b"POST /api/v1/authenticate HTTP/1.1\r\nHost: ts\r\n")  # never ends
            stalled.append(sock)
        for _ in range(5):  # a new connection each time, as new clients would
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                who = pb_grpc.TokenServiceStub(channel).Authenticate(
                    pb.AuthenticateRequest(token=raw), timeout=10)
            assert who.user_email == "a@acme.test"
        # Every one ends: beyond the cap at once (503, or a reset when the request's
        # bytes arrived as it closed), the others at the header timeout (408).
        answers = collections.Counter(_answer(s) for s in stalled)
        stalled.clear()
        timed_out, refused = b"HTTP/1.1 408 Request Timeout", b"HTTP/1.1 503 Service Unavailable"
        assert set(answers) <= {timed_out, refused, b"reset"}, answers
        assert 0 < answers[timed_out] <= 64 and answers[refused] > 0, answers
        assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        for sock in stalled:
            sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
