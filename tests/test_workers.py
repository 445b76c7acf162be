"""`tokenservice serve --workers N`: processes sharing one port, state only in the database."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice.v1 import token_service_pb2_grpc as pb_grpc

TOKENSERVICE = str(Path(sys.executable).with_name("tokenservice"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(p) for p in (task / "children").read_text().split()]
    return out


@pytest.mark.slow
def test_workers_share_the_port_see_one_database_and_drain_on_sigterm(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ts.db'}"
    env = {**os.environ, "TOKENSERVICE_DATABASE_URL": url, "TOKENSERVICE_BCRYPT_ROUNDS": "4"}

    def cli(*args: str) -> str:
        done = subprocess.run([TOKENSERVICE, *args], env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    cli("user", "add", "--email", "w@example.com", "--org", "acme",
        "--permissions", "api_token:manage,pass:read")
    raw = cli("token", "create", "--email", "w@example.com", "--name", "w",
              "--scopes", "pass:read").strip().splitlines()[-1]
    grpc_port, http_port = _free_port(), _free_port()
    server = subprocess.Popen(
        [TOKENSERVICE, "serve", "--workers", "2", "--grpc-port", str(grpc_port),
         "--http-port", str(http_port)], env=env, stderr=subprocess.DEVNULL,
    )
    channels = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.2)
        assert len(_children(server.pid)) == 2
        # Eight connections: the kernel spreads them over both workers.
        channels = [grpc.insecure_channel(f"127.0.0.1:{grpc_port}",
                                          [("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(8)]
        stubs = [pb_grpc.TokenServiceStub(c) for c in channels]
        for stub in stubs:
            assert stub.Authenticate(pb.AuthenticateRequest(token=raw), timeout=10).scopes == [
                "pass:read"
            ]
        cli("user", "disable", "--email", "w@example.com")
        for stub in stubs:  # no worker remembers anything but the secret's verification
            with pytest.raises(grpc.RpcError) as error:
                stub.Authenticate(pb.AuthenticateRequest(token=raw), timeout=10)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        workers = _children(server.pid)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
                f"/proc/{pid}/status").read_text()
    finally:
        for channel in channels:
            channel.close()
        if server.poll() is None:
            server.kill()
            server.wait()


@pytest.mark.slow
def test_without_workers_the_port_is_not_shared(tmp_path: Path) -> None:
    env = {**os.environ, "TOKENSERVICE_DATABASE_URL": f"sqlite:///{tmp_path / 'ts.db'}"}
    port = _free_port()
    first = subprocess.Popen([TOKENSERVICE, "serve", "--no-rest", "--grpc-port", str(port)],
                             env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        second = subprocess.run([TOKENSERVICE, "serve", "--no-rest", "--grpc-port", str(port)],
                                env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        assert "in use" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)


@pytest.mark.slow
def test_workers_get_their_configuration_off_the_command_line(tmp_path: Path) -> None:
    """The database URL (a password, on PostgreSQL) never reaches a worker's command
    line, which anyone on the machine can read; the workers still get every setting."""
    marker = "hunter2"
    url = f"sqlite:///{tmp_path / f'pw-{marker}.db'}"
    scopes = tmp_path / "scopes.toml"
    scopes.write_text('[scopes."pass:read"]\ndescription = "Read passes"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSERVICE_")}
    grpc_port = _free_port()
    server = subprocess.Popen(
        [TOKENSERVICE, "serve", "--workers", "2", "--no-rest", "--grpc-port", str(grpc_port),
         "--database-url", url, "--scopes-file", str(scopes), "--bcrypt-rounds", "5"],
        env=env, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while len(_children(server.pid)) < 2 or not _answers(grpc_port):
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.2)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            listed = pb_grpc.TokenServiceStub(channel).ListScopes(pb.ListScopesRequest(),
                                                                  timeout=10)
        assert [s.name for s in listed.scopes] == ["pass:read"]  # the scopes file reached them
        for pid in _children(server.pid):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            assert marker not in cmdline and "--database-url" not in cmdline, cmdline
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert f"TOKENSERVICE_DATABASE_URL={url}".encode() in environ
            assert b"TOKENSERVICE_BCRYPT_ROUNDS=5" in environ
            assert os.stat(f"/proc/{pid}/environ").st_mode & 0o077 == 0  # the user's alone
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_workers_end_with_a_supervisor_killed_with_sigkill(tmp_path: Path) -> None:
    """A supervisor that cannot drain (kill -9, the OOM killer) must not leave its
    workers serving the port for ever, beside the next supervisor's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSERVICE_")}
    grpc_port = _free_port()
    server = subprocess.Popen(
        [TOKENSERVICE, "serve", "--workers", "2", "--no-rest", "--grpc-port", str(grpc_port),
         "--database-url", f"sqlite:///{tmp_path / 'k.db'}", "--bcrypt-rounds", "4"],
        env=env, stderr=subprocess.DEVNULL,
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(_children(server.pid)) < 2 or not _answers(grpc_port):
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.2)
        workers = _children(server.pid)
    finally:
        server.kill()
        server.wait()
    deadline = time.monotonic() + 60
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [pid for pid in workers if _running(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)  # not left behind, whatever the outcome
    assert workers and not alive
    assert not _answers(grpc_port)


def _running(pid: int) -> bool:
    """Still running: neither gone nor a zombie waiting for whoever adopted it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
