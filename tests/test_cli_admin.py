"""The administration commands, run as real processes against a real server's database."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from conftest import bearer, cli
from test_cli import assert_one_line_error

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice.v1 import token_service_pb2_grpc as pb_grpc


@pytest.fixture
def db(tmp_path: Path) -> dict[str, str]:
    env = {"TOKENSERVICE_DATABASE_URL": f"sqlite:///{tmp_path / 'admin.db'}"}
    for email, org, perms in (
        ("ops@acme.test", "acme", "api_token:manage,api_token:admin,pass:read,invoice.view"),
        ("dev@acme.test", "acme", "api_token:manage,pass:read"),
        ("boss@evil.test", "evil", "pass:read"),
    ):
        cli("user", "add", "--email", email, "--org", org, "--permissions", perms, env=env,
            check=True)
    return env


def token_for(db: dict[str, str], email: str, scopes: str, name: str = "boot") -> str:
    return cli("token", "create", "--email", email, "--name", name, "--scopes", scopes,
               env=db, check=True).stdout.splitlines()[-1]


def test_user_list_is_a_table_or_json_lines(db) -> None:
    table = cli("user", "list", env=db, check=True).stdout.splitlines()
    assert table[0].split() == ["EMAIL", "ORG", "STATE", "PERMISSIONS", "CREATED"]
    assert [line.split()[0] for line in table[1:]] == [
        "dev@acme.test", "ops@acme.test", "boss@evil.test"]
    lines = cli("user", "list", "--org", "acme", "--json", env=db, check=True).stdout
    users = [json.loads(line) for line in lines.splitlines()]
    assert [u["email"] for u in users] == ["dev@acme.test", "ops@acme.test"]
    assert users[0]["permissions"] == ["api_token:manage", "pass:read"]
    assert users[0]["disabled"] is False and users[0]["orgId"] == "acme"


def test_disable_then_enable_brings_tokens_back(db, spawn) -> None:
    raw = token_for(db, "dev@acme.test", "pass:read")
    server = spawn(db["TOKENSERVICE_DATABASE_URL"])
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TokenServiceStub(channel)
        assert stub.Authenticate(pb.AuthenticateRequest(token=raw)).user_email
        cli("user", "disable", "--email", "dev@acme.test", env=db, check=True)
        with pytest.raises(grpc.RpcError):
            stub.Authenticate(pb.AuthenticateRequest(token=raw))
        listed = cli("user", "list", "--json", env=db, check=True).stdout.splitlines()
        assert any(json.loads(u)["disabled"] for u in listed)
        enabled = cli("user", "enable", "--email", "DEV@acme.test", env=db)
        assert enabled.returncode == 0 and "enabled" in enabled.stdout
        assert stub.Authenticate(pb.AuthenticateRequest(token=raw)).user_email == "dev@acme.test"


def test_set_permissions_narrows_tokens_at_their_next_use(db, spawn) -> None:
    raw = token_for(db, "ops@acme.test", "pass:read,invoice.view")
    server = spawn(db["TOKENSERVICE_DATABASE_URL"])
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TokenServiceStub(channel)
        assert list(stub.Authenticate(pb.AuthenticateRequest(token=raw)).scopes) == [
            "pass:read", "invoice.view"]
        result = cli("user", "set-permissions", "--email", "ops@acme.test",
                     "--permissions", "api_token:manage,pass:read", env=db)
        assert result.returncode == 0, result.stderr
        assert "api_token:manage,pass:read" in result.stdout
        assert list(stub.Authenticate(pb.AuthenticateRequest(token=raw)).scopes) == [
            "pass:read"]


def test_token_list_and_revoke(db, spawn) -> None:
    boot = token_for(db, "ops@acme.test", "api_token:manage,pass:read")
    server = spawn(db["TOKENSERVICE_DATABASE_URL"])
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TokenServiceStub(channel)
        child = stub.CreateToken(pb.CreateTokenRequest(name="child", scopes=["pass:read"]),
                                 metadata=bearer(boot))
        table = cli("token", "list", "--email", "ops@acme.test", env=db, check=True).stdout
        header, *rows = table.splitlines()
        assert header.split()[:4] == ["ID", "NAME", "PREFIX", "STATE"]
        assert [r.split()[1] for r in rows] == ["child", "boot"]
        assert all(r.split()[3] == "active" for r in rows)
        listed = cli("token", "list", "--email", "ops@acme.test", "--json", env=db,
                     check=True).stdout.splitlines()
        boot_id = json.loads(listed[1])["id"]
        assert json.loads(listed[0])["parentId"] == boot_id

        # A plain revoke leaves the child; --children takes it too.
        done = cli("token", "revoke", boot_id, env=db)
        assert done.returncode == 0 and boot_id in done.stdout
        with pytest.raises(grpc.RpcError):
            stub.Authenticate(pb.AuthenticateRequest(token=boot))
        assert stub.Authenticate(pb.AuthenticateRequest(token=child.token)).token_id
        tree = cli("token", "revoke", boot_id, "--children", "--json", env=db, check=True)
        assert json.loads(tree.stdout)["state"] == "REVOKED"
        with pytest.raises(grpc.RpcError):
            stub.Authenticate(pb.AuthenticateRequest(token=child.token))


def test_audit_prints_json_lines_newest_first(db) -> None:
    boot = cli("token", "create", "--email", "ops@acme.test", "--name", "boot", "--scopes",
               "pass:read", env=db, check=True).stdout
    assert boot
    lines = cli("audit", env=db, check=True).stdout.splitlines()
    events = [json.loads(line) for line in lines]
    assert [e["action"] for e in events] == ["token.create", "user.add", "user.add", "user.add"]
    assert all(e["actorEmail"] == "cli" for e in events)
    token_id = events[0]["tokenId"]
    acme = [json.loads(x) for x in cli("audit", "--org", "acme", env=db).stdout.splitlines()]
    assert {e["orgId"] for e in acme} == {"acme"} and len(acme) == 3
    one = cli("audit", "--token-id", token_id, "--limit", "5", env=db, check=True).stdout
    assert [json.loads(x)["tokenId"] for x in one.splitlines()] == [token_id]
    assert len(cli("audit", "--limit", "2", env=db).stdout.splitlines()) == 2
    assert boot.splitlines()[-1] not in "\n".join(lines)


@pytest.mark.parametrize("args", [
    ("user", "enable", "--email", "nobody@acme.test"),
    ("user", "set-permissions", "--email", "nobody@acme.test", "--permissions", "pass:read"),
    ("user", "set-permissions", "--email", "dev@acme.test", "--permissions", "pass:wrong"),
    ("user", "set-permissions", "--email", "dev@acme.test", "--permissions", ","),
    ("token", "list", "--email", "nobody@acme.test"),
    ("token", "revoke", "not-a-token-id"),
    ("token", "revoke", "0b4a1f52-3f2b-4d38-9a0e-1f7c2a9b6e11"),
    ("token", "revoke"),
    ("audit", "--limit", "0"),
    ("audit", "--limit", "many"),
    ("audit", "--token-id", "zzz"),
])
def test_bad_input_is_one_line_and_a_non_zero_exit(db, args) -> None:
    assert_one_line_error(cli(*args, env=db))
