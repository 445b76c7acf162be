"""What survives: kill -9, graceful restarts, and what never gets written down."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import bearer, cli
from google.protobuf.field_mask_pb2 import FieldMask

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice.v1 import token_service_pb2_grpc as pb_grpc


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


def bootstrap(url: str, email: str = "ops@acme.test") -> str:
    env = {"TOKENSERVICE_DATABASE_URL": url}
    cli("user", "add", "--email", email, "--org", "acme", "--permissions",
        "api_token:manage,pass:read", env=env, check=True)
    return cli("token", "create", "--email", email, "--name", "boot", "--scopes",
               "api_token:manage,pass:read", env=env, check=True).stdout.splitlines()[-1]


def stub_for(target: str) -> tuple[grpc.Channel, pb_grpc.TokenServiceStub]:
    channel = grpc.insecure_channel(target)
    return channel, pb_grpc.TokenServiceStub(channel)


def test_every_acknowledged_create_survives_kill_9(url, spawn) -> None:
    boot = bootstrap(url)
    server = spawn(url)
    channel, stub = stub_for(server.target)
    acknowledged = [
        stub.CreateToken(pb.CreateTokenRequest(name=f"t{i}", scopes=["pass:read"]),
                         metadata=bearer(boot), timeout=10).token
        for i in range(20)
    ]
    channel.close()
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    restarted = spawn(url)
    channel, stub = stub_for(restarted.target)
    for raw in acknowledged:
        assert stub.Authenticate(pb.AuthenticateRequest(token=raw), timeout=10).token_id
    channel.close()


def test_a_graceful_restart_keeps_last_used_at(url, spawn) -> None:
    boot = bootstrap(url)
    server = spawn(url)  # flush interval 15 s: nothing is written before the stop
    channel, stub = stub_for(server.target)
    made = stub.CreateToken(pb.CreateTokenRequest(name="used", scopes=["pass:read"]),
                            metadata=bearer(boot))
    before = time.time()
    stub.Authenticate(pb.AuthenticateRequest(token=made.token))
    channel.close()
    assert server.stop(signal.SIGTERM) == 0
    restarted = spawn(url)
    channel, stub = stub_for(restarted.target)
    got = stub.GetToken(pb.GetTokenRequest(id=made.api_token.id), metadata=bearer(boot))
    channel.close()
    assert got.HasField("last_used_at")
    assert got.last_used_at.seconds >= int(before) - 1
    assert restarted.stop(signal.SIGINT) == 0


def test_last_used_at_is_written_in_the_background(url, spawn) -> None:
    boot = bootstrap(url)
    server = spawn(url, env={"TOKENSERVICE_LAST_USED_FLUSH_SECONDS": "0.5"})
    channel, stub = stub_for(server.target)
    made = stub.CreateToken(pb.CreateTokenRequest(name="used", scopes=["pass:read"]),
                            metadata=bearer(boot))
    stub.Authenticate(pb.AuthenticateRequest(token=made.token))
    channel.close()
    # Read the database itself, from another process, while the server runs.
    import sqlite3

    path = url.removeprefix("sqlite:///")
    deadline = time.monotonic() + 30
    value = None
    while value is None and time.monotonic() < deadline:
        with sqlite3.connect(path) as db:
            value = db.execute("SELECT last_used_at FROM api_tokens WHERE token_prefix = ?",
                               (made.api_token.token_prefix,)).fetchone()[0]
        time.sleep(0.2)
    assert value is not None, "last_used_at never reached the database"


def test_sigterm_lets_an_in_flight_call_finish(url, spawn) -> None:
    boot = bootstrap(url)
    # 15 bcrypt rounds make CreateToken take a second or more: long enough to stop mid-call.
    server = spawn(url, "--bcrypt-rounds", "15")
    channel, stub = stub_for(server.target)
    result: dict[str, object] = {}

    def slow_create() -> None:
        try:
            result["token"] = stub.CreateToken(
                pb.CreateTokenRequest(name="slow", scopes=["pass:read"]),
                metadata=bearer(boot), timeout=60).token
        except grpc.RpcError as error:
            result["error"] = error.code()

    worker = threading.Thread(target=slow_create)
    worker.start()
    time.sleep(0.3)
    assert server.stop(signal.SIGTERM) == 0
    worker.join(timeout=60)
    channel.close()
    assert "token" in result, result
    restarted = spawn(url)
    channel, stub = stub_for(restarted.target)
    assert stub.Authenticate(pb.AuthenticateRequest(token=result["token"])).token_id
    channel.close()


def test_no_raw_token_or_secret_in_the_database_or_the_log(url, spawn, tmp_path: Path) -> None:
    boot = bootstrap(url)
    server = spawn(url)
    channel, stub = stub_for(server.target)
    raws = [boot]
    for i in range(3):
        raws.append(stub.CreateToken(pb.CreateTokenRequest(name=f"t{i}", scopes=["pass:read"]),
                                     metadata=bearer(boot)).token)
    for raw in raws:
        stub.Authenticate(pb.AuthenticateRequest(token=raw))
        with pytest.raises(grpc.RpcError):
            stub.Authenticate(pb.AuthenticateRequest(token=raw + "x"))
        with pytest.raises(grpc.RpcError):
            stub.CreateToken(pb.CreateTokenRequest(name=raw, scopes=[raw]), metadata=bearer(raw))
    channel.close()
    assert server.stop(signal.SIGTERM) == 0
    db_bytes = b"".join(p.read_bytes() for p in tmp_path.glob("store.db*"))
    log = server.log()
    assert '"msg": "rpc"' in log  # the log is there and has the per-RPC lines
    for raw in raws:
        secret = raw[16:48]  # the part of the token that is only ever stored as a hash
        for text in (raw, secret):
            assert text.encode() not in db_bytes
            assert text not in log


def _churn(target: str, boot: str, stop: threading.Event) -> None:
    """Creates, renames, rotates and revokes tokens until the server dies under it."""
    channel, stub = stub_for(target)
    meta = bearer(boot)
    i = 0
    try:
        while not stop.is_set():
            i += 1
            made = stub.CreateToken(pb.CreateTokenRequest(name=f"c{i}", scopes=["pass:read"]),
                                    metadata=meta, timeout=5).api_token
            stub.UpdateToken(pb.UpdateTokenRequest(
                api_token=pb.ApiToken(id=made.id, name=f"c{i}-renamed"),
                update_mask=FieldMask(paths=["name"])), metadata=meta, timeout=5)
            if i % 2:
                stub.RotateToken(pb.RotateTokenRequest(id=made.id), metadata=meta, timeout=5)
            else:
                stub.RevokeToken(pb.RevokeTokenRequest(id=made.id), metadata=meta, timeout=5)
    except grpc.RpcError:
        return  # the server was killed
    finally:
        channel.close()


def test_kill_9_never_leaves_a_change_without_its_audit_event(url, spawn) -> None:
    """Changes and their events commit together: after any crash, each implies the other."""
    import random
    import sqlite3

    boot = bootstrap(url)
    for _ in range(4):
        server = spawn(url)
        stop = threading.Event()
        workers = [threading.Thread(target=_churn, args=(server.target, boot, stop))
                   for _ in range(3)]
        for worker in workers:
            worker.start()
        time.sleep(random.uniform(0.3, 1.0))
        assert server.stop(signal.SIGKILL) == -signal.SIGKILL
        stop.set()
        for worker in workers:
            worker.join(timeout=30)

    with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
        tokens = {row[0]: row[1:] for row in db.execute(
            "SELECT id, name, revoked_at, replaced_by_id, rotated_from_id FROM api_tokens")}
        events: dict[tuple[str, str], list[dict]] = {}
        for action, token_id, details in db.execute(
                "SELECT action, token_id, details FROM audit_events ORDER BY time"):
            events.setdefault((action, token_id.replace("-", "")), []).append(json.loads(details))
    assert len(tokens) > 10, "the churn made changes before each kill"
    for token_id, (name, revoked_at, replaced_by, rotated_from) in tokens.items():
        assert ("token.create", token_id) in events, f"{name} exists without its event"
        if revoked_at is not None and replaced_by is None:
            assert ("token.revoke", token_id) in events, f"{name} revoked without its event"
        if replaced_by is not None:
            assert ("token.rotate", token_id) in events, f"{name} rotated without its event"
        if name.endswith("-renamed") and rotated_from is None:  # a replacement inherits it
            assert events[("token.update", token_id)][-1]["name"] == name
    for (action, token_id), _ in events.items():
        if not action.startswith("token."):
            continue
        assert token_id in tokens, f"{action} recorded for a token that was never stored"
        if action == "token.revoke":
            assert tokens[token_id][1] is not None, "revocation recorded but not made"
        if action == "token.rotate":
            assert tokens[token_id][2] is not None, "rotation recorded but not made"
        if action == "token.update":
            assert tokens[token_id][0].endswith("-renamed"), "update recorded but not made"
