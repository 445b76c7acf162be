"""Two `tokenservice serve` processes on one PostgreSQL: what one replica does, the other sees.

Replica B is warmed first (its verified-secret cache holds the token), so the
tests prove revocation and user state are read from the database on every
call, not from anything a replica remembers.
"""

from __future__ import annotations

import grpc
import pytest
from conftest import bearer, cli
from google.protobuf.field_mask_pb2 import FieldMask
from pgcluster import PgCluster

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice.v1 import token_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.postgres


def _stub(target: str) -> tuple[grpc.Channel, pb_grpc.TokenServiceStub]:
    channel = grpc.insecure_channel(target)
    return channel, pb_grpc.TokenServiceStub(channel)


def _token_for(url: str, email: str, scopes: str) -> str:
    result = cli("token", "create", "--email", email, "--name", "boot", "--scopes", scopes,
                 "--database-url", url, check=True)
    return result.stdout.strip().splitlines()[-1]


def _auth(stub: pb_grpc.TokenServiceStub, token: str) -> pb.AuthenticateResponse:
    return stub.Authenticate(pb.AuthenticateRequest(token=token), timeout=10)


def _rejected(stub: pb_grpc.TokenServiceStub, token: str) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        _auth(stub, token)
    return caught.value.code()


@pytest.fixture
def replicas(pg_cluster: PgCluster, pg_database_url: str, spawn):
    cli("migrate", "--database-url", pg_database_url, check=True)
    a = spawn(pg_database_url)
    b = spawn(pg_database_url)
    channels = []
    stubs = []
    for server in (a, b):
        channel, stub = _stub(server.target)
        channels.append(channel)
        stubs.append(stub)
    yield pg_database_url, stubs[0], stubs[1]
    for channel in channels:
        channel.close()
    assert a.stop() == 0 and b.stop() == 0


def test_revoke_on_one_replica_is_refused_at_once_by_a_warm_other(replicas) -> None:
    url, a, b = replicas
    cli("user", "add", "--email", "ops@acme.test", "--org", "acme",
        "--permissions", "api_token:manage,pass:read", "--database-url", url, check=True)
    boot = _token_for(url, "ops@acme.test", "api_token:manage,pass:read")

    # Created on A, usable on B at once.
    created = a.CreateToken(pb.CreateTokenRequest(name="svc", scopes=["pass:read"]),
                            metadata=bearer(boot), timeout=10)
    for _ in range(5):
        assert _auth(b, created.token).token_id == created.api_token.id

    revoked = a.RevokeToken(pb.RevokeTokenRequest(id=created.api_token.id),
                            metadata=bearer(boot), timeout=10)
    assert revoked.HasField("revoked_at")
    assert _rejected(b, created.token) == grpc.StatusCode.UNAUTHENTICATED
    assert _rejected(a, created.token) == grpc.StatusCode.UNAUTHENTICATED
    # B also reports it revoked, and the other token still works on both.
    seen_on_b = b.GetToken(pb.GetTokenRequest(id=created.api_token.id),
                           metadata=bearer(boot), timeout=10)
    assert seen_on_b.revoked_at == revoked.revoked_at
    assert _auth(b, boot).user_email == "ops@acme.test"


def test_user_disable_stops_their_tokens_on_every_replica_at_once(replicas) -> None:
    url, a, b = replicas
    for email in ("leaver@acme.test", "stayer@acme.test"):
        cli("user", "add", "--email", email, "--org", "acme",
            "--permissions", "api_token:manage,pass:read", "--database-url", url, check=True)
    leaver = _token_for(url, "leaver@acme.test", "pass:read")
    stayer = _token_for(url, "stayer@acme.test", "pass:read")
    for _ in range(5):
        for stub in (a, b):
            assert _auth(stub, leaver).user_email == "leaver@acme.test"
            assert _auth(stub, stayer).user_email == "stayer@acme.test"

    cli("user", "disable", "--email", "leaver@acme.test", "--database-url", url, check=True)
    for stub in (b, a):
        assert _rejected(stub, leaver) == grpc.StatusCode.UNAUTHENTICATED
        assert _auth(stub, stayer).user_email == "stayer@acme.test"


def test_narrowing_a_users_permissions_narrows_their_tokens_on_every_replica(replicas) -> None:
    url, a, b = replicas
    cli("user", "add", "--email", "dev@acme.test", "--org", "acme", "--permissions",
        "api_token:manage,pass:read,invoice.view", "--database-url", url, check=True)
    boot = _token_for(url, "dev@acme.test", "api_token:manage,pass:read,invoice.view")
    # A token made through replica A, warm in both replicas' caches.
    made = a.CreateToken(pb.CreateTokenRequest(name="svc", scopes=["pass:read", "invoice.view"]),
                         metadata=bearer(boot), timeout=10)
    for _ in range(3):
        for stub in (a, b):
            assert list(_auth(stub, made.token).scopes) == ["pass:read", "invoice.view"]

    cli("user", "set-permissions", "--email", "dev@acme.test", "--permissions",
        "api_token:manage,pass:read", "--database-url", url, check=True)
    for stub in (b, a):
        assert list(_auth(stub, made.token).scopes) == ["pass:read"]
    # A token's own scopes changed through A hold on B at its next use as well.
    a.UpdateToken(pb.UpdateTokenRequest(
        api_token=pb.ApiToken(id=made.api_token.id, scopes=["api_token:manage"]),
        update_mask=FieldMask(paths=["scopes"])), metadata=bearer(boot), timeout=10)
    assert list(_auth(b, made.token).scopes) == ["api_token:manage"]
    # And the narrowed user cannot mint or widen past it through either replica.
    with pytest.raises(grpc.RpcError) as caught:
        b.UpdateToken(pb.UpdateTokenRequest(
            api_token=pb.ApiToken(id=made.api_token.id, scopes=["invoice.view"]),
            update_mask=FieldMask(paths=["scopes"])), metadata=bearer(boot), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_rotation_on_one_replica_holds_on_the_other(replicas) -> None:
    url, a, b = replicas
    cli("user", "add", "--email", "ci@acme.test", "--org", "acme", "--permissions",
        "api_token:manage,pass:read", "--database-url", url, check=True)
    boot = _token_for(url, "ci@acme.test", "api_token:manage,pass:read")
    made = a.CreateToken(pb.CreateTokenRequest(name="svc", scopes=["pass:read"]),
                         metadata=bearer(boot), timeout=10)
    assert _auth(b, made.token).token_id == made.api_token.id  # warm on B
    rotated = a.RotateToken(pb.RotateTokenRequest(id=made.api_token.id), metadata=bearer(boot),
                            timeout=10)
    assert _rejected(b, made.token) == grpc.StatusCode.UNAUTHENTICATED
    assert _auth(b, rotated.token).token_id == rotated.api_token.id
    # The second rotation of the same token loses, whichever replica it reaches.
    with pytest.raises(grpc.RpcError) as caught:
        b.RotateToken(pb.RotateTokenRequest(id=made.api_token.id), metadata=bearer(boot),
                      timeout=10)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
