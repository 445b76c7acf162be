"""The shim as deployed: `serve` with REST, `tokenservice rest` alone, drain on stop."""

from __future__ import annotations

import os
import signal
import subprocess
import threading

import httpx
import pytest
from conftest import TOKENSERVICE, free_port
from rest_helpers import bearer_header, running_rest


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
