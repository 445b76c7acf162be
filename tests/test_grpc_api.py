"""Every rule of the gRPC API (docs/api.md), through a real server and real stubs."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from conftest import RunningServer, bearer
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from tokenservice.v1 import token_service_pb2 as pb


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def violations(error: grpc.RpcError) -> dict[str, list[str]]:
    status = rpc_status.from_call(error)
    assert status is not None, "no rich status on the error"
    out: dict[str, list[str]] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            for v in bad.field_violations:
                out.setdefault(v.field, []).append(v.description)
    return out


def ts_in(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC) + timedelta(seconds=seconds))
    return stamp


def create(ts: RunningServer, token: str, name="svc", scopes=("pass:read",), **kw):
    return ts.stub.CreateToken(
        pb.CreateTokenRequest(name=name, scopes=list(scopes), **kw), metadata=bearer(token),
        timeout=10,
    )


# Create.


def test_create_returns_the_raw_token_once_and_it_authenticates(ts: RunningServer) -> None:
    boot = ts.manager()
    created = create(ts, boot, name="  POS Integration  ", scopes=["pass:read", "invoice.view"])
    raw, meta = created.token, created.api_token
    assert raw.startswith("tks_") and meta.token_prefix == raw[:12]
    assert set(raw) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
    assert meta.name == "POS Integration"
    assert list(meta.scopes) == ["pass:read", "invoice.view"]
    assert meta.created_by_email == "manager@acme.test" and meta.org_id == "acme"
    assert uuid.UUID(meta.id)
    assert meta.HasField("created_at") and not meta.HasField("last_used_at")
    assert not meta.HasField("revoked_at") and not meta.HasField("expires_at")
    who = ts.authenticate(raw)
    assert who.token_id == meta.id and who.user_email == "manager@acme.test"
    assert list(who.scopes) == ["pass:read", "invoice.view"]
    # Never again: not in Get, not in List.
    got = ts.stub.GetToken(pb.GetTokenRequest(id=meta.id), metadata=bearer(boot))
    assert raw not in str(got)
    listed = ts.stub.ListTokens(pb.ListTokensRequest(), metadata=bearer(boot))
    assert raw not in str(listed)


@pytest.mark.parametrize(
    ("name", "scopes", "field"),
    [
        ("", ["pass:read"], "name"),
        ("   ", ["pass:read"], "name"),
        ("x" * 201, ["pass:read"], "name"),
        ("bad\x00name", ["pass:read"], "name"),
        ("tab\there", ["pass:read"], "name"),
        ("evil\u202egnp.exe", ["pass:read"], "name"),
        ("isolate\u2066x", ["pass:read"], "name"),
        ("ok", [], "scopes"),
        ("ok", ["no:such"], "scopes"),
        ("ok", ["pass:read", "pass:read"], "scopes"),
        ("ok", ["pass:read", " PASS:READ "], "scopes"),
        ("ok", ["invoice.create"], "scopes"),  # in the catalog, not held
    ],
)
def test_create_rejects_bad_input_naming_the_field(ts: RunningServer, name, scopes, field) -> None:
    boot = ts.manager()
    error = rpc_error(create, ts, boot, name=name, scopes=scopes)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations(error), violations(error)


def test_create_accepts_a_200_character_name(ts: RunningServer) -> None:
    boot = ts.manager()
    assert create(ts, boot, name="é" * 200).api_token.name == "é" * 200


def test_create_names_every_offending_field_at_once(ts: RunningServer) -> None:
    boot = ts.manager()
    error = rpc_error(create, ts, boot, name="", scopes=["nope"], expires_at=ts_in(-60))
    assert set(violations(error)) == {"name", "scopes", "expires_at"}


def test_expiry_must_be_in_the_future(ts: RunningServer) -> None:
    boot = ts.manager()
    error = rpc_error(create, ts, boot, expires_at=ts_in(-1))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expires_at" in violations(error)
    made = create(ts, boot, expires_at=ts_in(3600))
    assert made.api_token.expires_at.seconds == pytest.approx(time.time() + 3600, abs=5)
    assert ts.authenticate(made.token).expires_at.seconds == made.api_token.expires_at.seconds


def test_a_token_cannot_mint_a_stronger_token_even_if_its_user_could(ts: RunningServer) -> None:
    ts.add_user("dev@acme.test", permissions=["api_token:manage", "pass:read", "invoice.view"])
    weak = ts.mint("dev@acme.test", scopes=["api_token:manage", "pass:read"])
    error = rpc_error(create, ts, weak, scopes=["invoice.view"])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "scopes" in violations(error)
    assert create(ts, weak, scopes=["pass:read"]).api_token.scopes == ["pass:read"]


def test_create_needs_credentials_and_the_manage_scope(ts: RunningServer) -> None:
    ts.add_user("reader@acme.test", permissions=["pass:read", "api_token:manage"])
    reader = ts.mint("reader@acme.test", scopes=["pass:read"])
    request = pb.CreateTokenRequest(name="x", scopes=["pass:read"])
    for metadata in [(), bearer("tks_garbage"), (("authorization", "Basic abc"),)]:
        error = rpc_error(ts.stub.CreateToken, request, metadata=metadata)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    error = rpc_error(ts.stub.CreateToken, request, metadata=bearer(reader))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


def test_bearer_scheme_is_case_insensitive(ts: RunningServer) -> None:
    boot = ts.manager()
    md = (("authorization", f"bEaReR {boot}"),)
    assert ts.stub.ListTokens(pb.ListTokensRequest(), metadata=md).tokens


# Authenticate.


def test_authenticate_returns_scopes_cut_to_the_users_current_permissions(
    ts: RunningServer,
) -> None:
    ts.add_user("svc@acme.test", permissions=["pass:read", "pass:create"])
    raw = ts.mint("svc@acme.test", scopes=["pass:read", "pass:create"])
    assert list(ts.authenticate(raw).scopes) == ["pass:read", "pass:create"]
    from tokenservice_server.db import connection
    from tokenservice_server.models import User

    with connection(ts.server.store.db):
        User.update(permissions=["pass:read"]).where(User.email == "svc@acme.test").execute()
    assert list(ts.authenticate(raw).scopes) == ["pass:read"]


def test_every_authentication_failure_is_the_same(ts: RunningServer) -> None:
    boot = ts.manager()
    good = create(ts, boot).token
    revoked = create(ts, boot)
    ts.stub.RevokeToken(pb.RevokeTokenRequest(id=revoked.api_token.id), metadata=bearer(boot))
    wrong_secret = good[:20] + ("A" if good[20] != "A" else "B") + good[21:]
    from tokenservice_server import tokens

    body = wrong_secret[:-6]
    wrong_secret = body + tokens.checksum(body)  # well-formed, right lookup id, wrong secret
    unknown, _ = tokens.new_token("tks_")
    bad_checksum = good[:-1] + ("0" if good[-1] != "0" else "1")
    messages = set()
    for bad in ["", "x", "tks_", good + "x", bad_checksum, wrong_secret, unknown,
                revoked.token, "tks_" + "é" * 50, good.replace("tks_", "sk_")]:
        error = rpc_error(ts.authenticate, bad)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, bad
        messages.add(error.details())
    assert len(messages) == 1
    assert ts.authenticate(good).token_id


def test_a_token_expiring_in_two_seconds_stops_working(ts: RunningServer) -> None:
    boot = ts.manager()
    made = create(ts, boot, expires_at=ts_in(2))
    assert ts.authenticate(made.token).token_id == made.api_token.id
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ts.authenticate(made.token)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            break
        time.sleep(0.2)
    else:
        pytest.fail("the token still authenticates long after it expired")
    assert time.time() >= made.api_token.expires_at.seconds


def test_a_disabled_users_tokens_stop_at_once(ts: RunningServer) -> None:
    ts.add_user("leaver@acme.test", permissions=["pass:read"])
    raw = ts.mint("leaver@acme.test", scopes=["pass:read"])
    for _ in range(3):
        ts.authenticate(raw)  # warm: the secret is in the verified cache
    ts.disable_user("leaver@acme.test")
    assert rpc_error(ts.authenticate, raw).code() == grpc.StatusCode.UNAUTHENTICATED


def test_listscopes_needs_no_credentials_and_reports_the_catalog(ts: RunningServer) -> None:
    scopes = ts.stub.ListScopes(pb.ListScopesRequest()).scopes
    by_name = {s.name: s for s in scopes}
    assert len(scopes) == 11
    assert by_name["api_token:manage"].api_only and by_name["app:manage"].api_only
    assert by_name["api_token:verify"].api_only
    assert not by_name["invoice.view"].api_only
    assert by_name["pass:read"].description


# Reach: Get, Revoke, List across users and orgs.


@pytest.fixture
def org(ts: RunningServer):
    """Two members and an admin in acme, and a stranger in another org, each with a token."""
    perms = ["api_token:manage", "pass:read"]
    ts.add_user("alice@acme.test", permissions=perms)
    ts.add_user("bob@acme.test", permissions=perms)
    ts.add_user("admin@acme.test", permissions=[*perms, "api_token:admin"])
    ts.add_user("eve@other.test", org="other", permissions=[*perms, "api_token:admin"])
    return {
        "alice": ts.mint("alice@acme.test", scopes=perms),
        "bob": ts.mint("bob@acme.test", scopes=perms),
        "admin": ts.mint("admin@acme.test", scopes=[*perms, "api_token:admin"]),
        "eve": ts.mint("eve@other.test", scopes=[*perms, "api_token:admin"]),
    }


def test_another_orgs_token_is_not_found(ts: RunningServer, org) -> None:
    alice_token = create(ts, org["alice"]).api_token
    for call, request in [
        (ts.stub.GetToken, pb.GetTokenRequest(id=alice_token.id)),
        (ts.stub.RevokeToken, pb.RevokeTokenRequest(id=alice_token.id)),
    ]:
        error = rpc_error(call, request, metadata=bearer(org["eve"]))
        assert error.code() == grpc.StatusCode.NOT_FOUND
    listed = ts.stub.ListTokens(pb.ListTokensRequest(), metadata=bearer(org["eve"])).tokens
    assert alice_token.id not in {t.id for t in listed}


def test_a_colleagues_token_is_not_found_without_admin(ts: RunningServer, org) -> None:
    alice_token = create(ts, org["alice"]).api_token
    for call, request in [
        (ts.stub.GetToken, pb.GetTokenRequest(id=alice_token.id)),
        (ts.stub.RevokeToken, pb.RevokeTokenRequest(id=alice_token.id)),
    ]:
        assert rpc_error(call, request, metadata=bearer(org["bob"])).code() == (
            grpc.StatusCode.NOT_FOUND
        )
    bobs = ts.stub.ListTokens(pb.ListTokensRequest(), metadata=bearer(org["bob"])).tokens
    assert {t.created_by_email for t in bobs} == {"bob@acme.test"}


def test_unknown_and_malformed_ids_are_not_found(ts: RunningServer, org) -> None:
    for token_id in [str(uuid.uuid4()), "not-a-uuid", "'; DROP TABLE api_tokens; --"]:
        error = rpc_error(ts.stub.GetToken, pb.GetTokenRequest(id=token_id),
                          metadata=bearer(org["alice"]))
        assert error.code() == grpc.StatusCode.NOT_FOUND
    error = rpc_error(ts.stub.GetToken, pb.GetTokenRequest(id=""), metadata=bearer(org["alice"]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_an_org_admin_lists_and_revokes_every_token_of_the_org(ts: RunningServer, org) -> None:
    alice_token = create(ts, org["alice"])
    listed = ts.stub.ListTokens(pb.ListTokensRequest(), metadata=bearer(org["admin"])).tokens
    emails = {t.created_by_email for t in listed}
    assert emails == {"alice@acme.test", "bob@acme.test", "admin@acme.test"}
    got = ts.stub.GetToken(pb.GetTokenRequest(id=alice_token.api_token.id),
                           metadata=bearer(org["admin"]))
    assert got.created_by_email == "alice@acme.test"
    revoked = ts.stub.RevokeToken(pb.RevokeTokenRequest(id=alice_token.api_token.id),
                                  metadata=bearer(org["admin"]))
    assert revoked.HasField("revoked_at")
    assert rpc_error(ts.authenticate, alice_token.token).code() == grpc.StatusCode.UNAUTHENTICATED


def test_admin_scope_counts_only_when_the_token_carries_it(ts: RunningServer, org) -> None:
    narrow = ts.mint("admin@acme.test", scopes=["api_token:manage"])
    alice_token = create(ts, org["alice"]).api_token
    error = rpc_error(ts.stub.GetToken, pb.GetTokenRequest(id=alice_token.id),
                      metadata=bearer(narrow))
    assert error.code() == grpc.StatusCode.NOT_FOUND


# Revoke.


def test_revocation_is_immediate_and_idempotent(ts: RunningServer) -> None:
    boot = ts.manager()
    made = create(ts, boot)
    for _ in range(3):
        ts.authenticate(made.token)
    first = ts.stub.RevokeToken(pb.RevokeTokenRequest(id=made.api_token.id), metadata=bearer(boot))
    assert first.HasField("revoked_at")
    assert rpc_error(ts.authenticate, made.token).code() == grpc.StatusCode.UNAUTHENTICATED
    again = ts.stub.RevokeToken(pb.RevokeTokenRequest(id=made.api_token.id), metadata=bearer(boot))
    assert again == first
    listed = ts.stub.ListTokens(pb.ListTokensRequest(), metadata=bearer(boot)).tokens
    assert [t.revoked_at for t in listed if t.id == made.api_token.id] == [first.revoked_at]


def test_a_revoked_caller_token_cannot_manage(ts: RunningServer) -> None:
    boot = ts.manager()
    second = create(ts, boot, scopes=["api_token:manage"])
    ts.stub.RevokeToken(pb.RevokeTokenRequest(id=second.api_token.id), metadata=bearer(boot))
    error = rpc_error(ts.stub.ListTokens, pb.ListTokensRequest(), metadata=bearer(second.token))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


# List.


def test_pagination_returns_each_token_once_newest_first(ts: RunningServer) -> None:
    boot = ts.manager()
    made = [create(ts, boot, name=f"t{i}").api_token.id for i in range(11)]
    seen: list[str] = []
    page_token = ""
    pages = 0
    while True:
        page = ts.stub.ListTokens(pb.ListTokensRequest(page_size=3, page_token=page_token),
                                  metadata=bearer(boot))
        assert len(page.tokens) <= 3
        seen += [t.id for t in page.tokens]
        pages += 1
        if not page.next_page_token:
            break
        page_token = page.next_page_token
    assert pages == 4  # 12 tokens (11 + the bootstrap one) in pages of 3
    assert len(seen) == len(set(seen)) == 12
    assert seen[:11] == list(reversed(made))
    created = [t.created_at.ToNanoseconds() for t in
               ts.stub.ListTokens(pb.ListTokensRequest(), metadata=bearer(boot)).tokens]
    assert created == sorted(created, reverse=True)


def test_page_size_default_clamp_and_negative(ts: RunningServer) -> None:
    boot = ts.manager()
    for i in range(55):
        create(ts, boot, name=f"t{i}")
    default = ts.stub.ListTokens(pb.ListTokensRequest(), metadata=bearer(boot))
    assert len(default.tokens) == 50 and default.next_page_token
    clamped = ts.stub.ListTokens(pb.ListTokensRequest(page_size=5000), metadata=bearer(boot))
    assert len(clamped.tokens) == 56 and clamped.next_page_token == ""
    error = rpc_error(ts.stub.ListTokens, pb.ListTokensRequest(page_size=-1),
                      metadata=bearer(boot))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_size" in violations(error)


@pytest.mark.parametrize("page_token", ["garbage", "!!!!", "MTpub3Q6YW51bWJlcg", "a" * 500])
def test_an_invalid_page_token_is_invalid_argument(ts: RunningServer, page_token) -> None:
    boot = ts.manager()
    error = rpc_error(ts.stub.ListTokens, pb.ListTokensRequest(page_token=page_token),
                      metadata=bearer(boot))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in violations(error)


def test_a_page_token_grants_nothing(ts: RunningServer, org) -> None:
    for i in range(3):
        create(ts, org["alice"], name=f"a{i}")
    page = ts.stub.ListTokens(pb.ListTokensRequest(page_size=1), metadata=bearer(org["alice"]))
    assert page.next_page_token
    bobs = ts.stub.ListTokens(pb.ListTokensRequest(page_token=page.next_page_token),
                              metadata=bearer(org["bob"])).tokens
    assert {t.created_by_email for t in bobs} <= {"bob@acme.test"}


# Health, reflection, throttling.


def test_health_and_reflection(ts: RunningServer) -> None:
    assert ts.health_status() == health_pb2.HealthCheckResponse.SERVING
    status = ts.health.Check(health_pb2.HealthCheckRequest(service="tokenservice.v1.TokenService"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(ts.channel)
    responses = list(stub.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="tokenservice.v1.TokenService"),
    ])))
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"tokenservice.v1.TokenService", "grpc.health.v1.Health"} <= names
    assert responses[1].file_descriptor_response.file_descriptor_proto


# NOT_SERVING while the database is really down: tests/test_postgres.py stops PostgreSQL.


def test_a_flood_of_bad_tokens_is_throttled_and_good_tokens_keep_working(
    ts: RunningServer,
) -> None:
    from tokenservice_server import tokens

    boot = ts.manager()
    good = create(ts, boot).token
    fresh = create(ts, boot).token  # never used before the flood: needs a bcrypt check
    errors = []
    started = time.monotonic()
    for _ in range(ts.config.auth_failure_burst + 20):
        bad, _ = tokens.new_token("tks_")
        errors.append(rpc_error(ts.authenticate, bad))
    elapsed = time.monotonic() - started
    codes = [e.code() for e in errors]
    assert codes[0] == grpc.StatusCode.UNAUTHENTICATED
    throttled = [e for e in errors if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert throttled, "the flood was never throttled"
    # A throttled client still earns a failure as its bucket refills: at most the
    # burst plus what the refill rate gave back while the flood lasted.
    admitted = codes.count(grpc.StatusCode.UNAUTHENTICATED)
    rate = ts.config.auth_failure_refill_per_second
    assert admitted <= ts.config.auth_failure_burst + rate * elapsed + 1
    retry = [d for d in rpc_status.from_call(throttled[-1]).details
             if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert retry, "RESOURCE_EXHAUSTED carries a RetryInfo"
    assert ts.authenticate(good).token_id
    assert ts.authenticate(fresh).token_id


def test_guessing_one_tokens_secret_is_throttled_but_its_owner_is_not(ts: RunningServer) -> None:
    from tokenservice_server import tokens

    boot = ts.manager()
    good = create(ts, boot).token
    ts.authenticate(good)
    lookup = tokens.parse(good, "tks_").lookup_id
    codes = set()
    for _ in range(ts.config.lookup_failure_burst + 5):
        body = "tks_" + lookup + tokens.new_token("tks_")[1].secret
        codes.add(rpc_error(ts.authenticate, body + tokens.checksum(body)).code())
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert ts.authenticate(good).token_id
