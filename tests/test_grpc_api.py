"""Every rule of the gRPC API (docs/api.md), through a real server and real stubs."""

from __future__ import annotations

import base64
import collections
import json
import logging
import socket
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from conftest import RunningServer, bearer, make_config, start_server
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice.v1 import token_service_pb2_grpc as pb_grpc


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
        ("ok", ["\tpass:read\n"], "scopes"),
        ("ok", ["api_to\u212aen:manage"], "scopes"),  # the Kelvin sign, lower() gives k
        ("ok", ["Pass:Read"], "scopes"),
        ("ok", ["invoice.create"], "scopes"),  # in the catalog, not held
    ],
)
def test_create_rejects_bad_input_naming_the_field(ts: RunningServer, name, scopes, field) -> None:
    boot = ts.manager()
    error = rpc_error(create, ts, boot, name=name, scopes=scopes)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations(error), violations(error)


@pytest.mark.parametrize(
    "scopes",
    [
        [f"no:such-scope-{i:03}" for i in range(300)],
        ["x" * 20_000],
        ["\u00e9\u202e" * 5_000],
        ["%" * 20_000, *[f"%{i}" for i in range(50)]],
    ],
    ids=["300-unknown", "20kb-name", "10k-non-ascii", "percent-signs"],
)
def test_a_huge_validation_error_stays_invalid_argument(ts: RunningServer, scopes) -> None:
    """However much a caller sends, the error's trailers stay under the client's limit."""
    boot = ts.manager()
    error = rpc_error(create, ts, boot, scopes=scopes)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    described = violations(error)["scopes"]
    assert 1 <= len(described) <= 10
    assert all(len(d) <= 200 for d in described)
    if len(scopes) > 10:
        assert "more problems" in described[-1]
    assert error.details().startswith("scopes: ")


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


def _forged_page_token(created: str) -> str:
    raw = f"1:{created}:0b6f6f0c7d1e4c399d6a5b3f0ad9b8c1".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# Well-formed base64 of the right shape, with a field out of its range or spelled
# another way: the created_at past 2**63 was a 500 on SQLite.
FORGED_PAGE_TOKENS = [
    pytest.param(_forged_page_token(c), id=f"created={c[:8]}")
    for c in (str(2**63), str(2**64 + 5), "-1", str(-(2**63) - 1), " 12", "0012", "+12", "1_000")
]


@pytest.mark.parametrize(
    "page_token",
    ["garbage", "!!!!", "MTpub3Q6YW51bWJlcg", pytest.param("a" * 500, id="a*500"),
     *FORGED_PAGE_TOKENS],
)
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


# Malformed requests: refused like any other bad call, never an UNKNOWN with a traceback.


def test_malformed_protobuf_is_invalid_argument_logged_once_and_throttled(
    database_url: str, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    from tokenservice_server.logs import rpc_log

    caplog.set_level(logging.INFO)
    running = start_server(make_config(
        database_url, auth_failure_burst=3, auth_failure_refill_per_second=0.01,
    ))
    try:
        def raw_call(method: str, body: bytes) -> grpc.RpcError:
            call = running.channel.unary_unary(
                f"/tokenservice.v1.TokenService/{method}",
                request_serializer=lambda b: b, response_deserializer=lambda b: b,
            )
            return rpc_error(call, body, timeout=10)

        bad_utf8 = b"\x0a\x02\xff\xfe"  # field 1 (a string) holding invalid UTF-8
        corrupt = b"\xff\xff\xff\xff"  # no valid tag
        truncated = b"\x0a\x05ab"  # a length past the end
        refused = [raw_call("Authenticate", bad_utf8), raw_call("CreateToken", corrupt),
                   raw_call("Authenticate", truncated)]
        for error in refused:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            # One fixed message: no parser text, nothing of the request echoed.
            assert error.details() == "the request is not a valid message for this method"
        # The three count as the client's failures: its burst is spent.
        assert raw_call("Authenticate", corrupt).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert rpc_error(running.authenticate, "tks_bogus").code() == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
    finally:
        running.channel.close()
        running.server.stop(grace=1)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "no ERROR lines"
    rpc_log.flush()
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines()
             if '"msg": "rpc"' in line and "TokenService" in line]
    assert [(r["method"].rsplit("/", 1)[1], r["status"]) for r in lines] == [
        ("Authenticate", "INVALID_ARGUMENT"),
        ("CreateToken", "INVALID_ARGUMENT"),
        ("Authenticate", "INVALID_ARGUMENT"),
        ("Authenticate", "RESOURCE_EXHAUSTED"),
        ("Authenticate", "RESOURCE_EXHAUSTED"),
    ]


# Client addresses over IPv6.


def test_over_ipv6_a_trusted_proxy_names_the_client_and_a_slash_64_is_one_client(
    database_url: str,
) -> None:
    """grpcio reports an IPv6 peer as ipv6:%5B::1%5D:port; read wrongly, the proxy is
    not recognised and every client it fronts shares one throttle bucket."""
    from tokenservice_server import tokens

    running = start_server(make_config(
        database_url, host="::1", auth_failure_burst=3, auth_failure_refill_per_second=0.01,
    ))
    try:
        with grpc.insecure_channel(f"[::1]:{running.server.port}") as channel:
            stub = pb_grpc.TokenServiceStub(channel)

            def attempt(client: str) -> grpc.StatusCode:
                bad, _ = tokens.new_token("tks_")
                return rpc_error(stub.Authenticate, pb.AuthenticateRequest(token=bad),
                                 metadata=(("x-forwarded-for", client),), timeout=10).code()

            codes = [attempt("2001:db8:0:1::1") for _ in range(4)]
            assert codes[0] == grpc.StatusCode.UNAUTHENTICATED
            assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED
            # Another address in the same /64: the same client.
            assert attempt("2001:db8:0:1::2") == grpc.StatusCode.RESOURCE_EXHAUSTED
            # Another /64, and an IPv4 client: not throttled.
            assert attempt("2001:db8:0:2::1") == grpc.StatusCode.UNAUTHENTICATED
            assert attempt("192.0.2.7") == grpc.StatusCode.UNAUTHENTICATED
    finally:
        running.channel.close()
        running.server.stop(grace=1)


def _wrong_secret(raw: str) -> str:
    """`raw`'s lookup id with another secret, and a valid checksum: a guess at its secret."""
    from tokenservice_server import tokens

    body = raw[:16] + tokens.new_token("tks_")[1].secret
    return body + tokens.checksum(body)


def test_a_flood_at_a_lookup_id_never_locks_its_owner_out(database_url: str) -> None:
    """Ten threads guess at three tokens' secrets; the owner, from its own address and
    with nothing cached (a fresh server: none of its secrets was ever checked here),
    authenticates with each, and the guesser is throttled on its own account."""
    # A refill slow enough that the guesser's budget is what it spent here.
    running = start_server(make_config(database_url, auth_failure_refill_per_second=0.01))
    attacker = (("x-forwarded-for", "198.51.100.66"),)
    owner = (("x-forwarded-for", "203.0.113.7"),)
    stop = threading.Event()
    seen: collections.Counter[grpc.StatusCode] = collections.Counter()
    lock = threading.Lock()
    threads: list[threading.Thread] = []
    try:
        running.add_user("victim@other.test", "other", ["pass:read"])
        victims = [running.mint("victim@other.test", ["pass:read"]) for _ in range(3)]

        def flood(i: int) -> None:
            with grpc.insecure_channel(running.target) as channel:
                stub = pb_grpc.TokenServiceStub(channel)
                while not stop.is_set():
                    request = pb.AuthenticateRequest(token=_wrong_secret(victims[i % 3]))
                    try:
                        stub.Authenticate(request, metadata=attacker, timeout=10)
                    except grpc.RpcError as error:
                        with lock:
                            seen[error.code()] += 1

        threads += [threading.Thread(target=flood, args=(i,)) for i in range(10)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        budget = running.config.auth_failure_burst
        while seen[grpc.StatusCode.RESOURCE_EXHAUSTED] < budget:
            assert time.monotonic() < deadline, seen
            time.sleep(0.05)
        for raw in victims:  # each one's first check, while the flood goes on
            who = running.stub.Authenticate(pb.AuthenticateRequest(token=raw), metadata=owner,
                                            timeout=10)
            assert who.user_email == "victim@other.test"
        stop.set()
        for thread in threads:
            thread.join()
        assert seen[grpc.StatusCode.UNAUTHENTICATED] >= 30  # its guesses were checked, then
        # its refusals were charged to it: the guesser is throttled on any token now.
        error = rpc_error(running.stub.Authenticate, pb.AuthenticateRequest(token="tks_x"),
                          metadata=attacker, timeout=10)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        running.channel.close()
        running.server.stop(grace=1)


def test_a_flood_of_wrong_secrets_from_one_org_leaves_another_orgs_checks_to_them(
    database_url: str,
) -> None:
    """Thirty threads at three addresses of one tenant check wrong secrets for forty
    of its own tokens, unthrottled (a tenant with many addresses); another tenant's
    first-time verifications all succeed meanwhile, none refused as busy."""
    running = start_server(make_config(
        database_url, bcrypt_rounds=6,
        auth_failure_burst=1_000_000, lookup_failure_burst=1_000_000,
    ))
    stop = threading.Event()
    seen: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    threads: list[threading.Thread] = []
    try:
        running.add_user("flood@evil.test", "evil", ["pass:read"])
        own = [running.mint("flood@evil.test", ["pass:read"]) for _ in range(40)]
        running.add_user("victim@acme.test", "acme", ["pass:read"])
        victims = [running.mint("victim@acme.test", ["pass:read"]) for _ in range(10)]

        def flood(i: int) -> None:
            metadata = (("x-forwarded-for", f"198.51.100.{i % 3 + 1}"),)
            with grpc.insecure_channel(running.target) as channel:
                stub = pb_grpc.TokenServiceStub(channel)
                n = i
                while not stop.is_set():
                    n += 1
                    request = pb.AuthenticateRequest(token=_wrong_secret(own[n % len(own)]))
                    try:
                        stub.Authenticate(request, metadata=metadata, timeout=10)
                    except grpc.RpcError as error:
                        with lock:
                            seen[error.details()] += 1

        threads += [threading.Thread(target=flood, args=(i,)) for i in range(30)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while seen["too many token verifications in progress"] < 30:
            assert time.monotonic() < deadline, seen  # the flood fills the pool
            time.sleep(0.05)
        owner = (("x-forwarded-for", "203.0.113.7"),)
        for raw in victims:  # each one's first check, while the flood goes on
            who = running.stub.Authenticate(pb.AuthenticateRequest(token=raw), metadata=owner,
                                            timeout=10)
            assert who.user_email == "victim@acme.test"
        assert seen["invalid, expired or revoked token"] > 0  # its checks ran too
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        running.channel.close()
        running.server.stop(grace=1)


# HTTP/2 limits: what an idle or abusive connection may hold.

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, PING, GOAWAY = 0x4, 0x6, 0x7
ENHANCE_YOUR_CALM = 0xB


def _frame(kind: int, flags: int = 0, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + b"\0\0\0\0" + payload


def _frames_until_closed(sock: socket.socket, send_after_settings: bytes = b""):
    """(type, payload) of each frame the server sends until it closes; its SETTINGS
    are acknowledged, as a client must."""
    buffer = b""
    while True:
        while len(buffer) < 9 or len(buffer) < 9 + int.from_bytes(buffer[:3], "big"):
            chunk = sock.recv(65536)
            if not chunk:
                return
            buffer += chunk
        length, kind, flags = int.from_bytes(buffer[:3], "big"), buffer[3], buffer[4]
        payload, buffer = buffer[9:9 + length], buffer[9 + length:]
        if kind == SETTINGS and not flags & 1:
            sock.sendall(_frame(SETTINGS, 1) + send_after_settings)
        yield kind, payload


def _announced_settings(frames: list[tuple[int, bytes]]) -> dict[int, int]:
    settings = next(p for k, p in frames if k == SETTINGS and p)
    return {int.from_bytes(settings[i:i + 2], "big"): int.from_bytes(settings[i + 2:i + 6], "big")
            for i in range(0, len(settings), 6)}


def test_by_default_a_connection_gets_a_stream_limit_and_requests_a_size_limit(
    ts: RunningServer,
) -> None:
    with socket.create_connection(("127.0.0.1", ts.server.port), timeout=30) as sock:
        sock.sendall(PREFACE + _frame(SETTINGS))
        frames = [next(f for f in _frames_until_closed(sock) if f[0] == SETTINGS)]
    assert 0 < _announced_settings(frames).get(0x3, 2**31) <= 1000  # MAX_CONCURRENT_STREAMS
    error = rpc_error(ts.authenticate, "tks_" + "x" * 100_000)  # far past any real request
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ts.authenticate(ts.manager()).user_email  # and the server carries on


def test_idle_http2_connections_are_told_to_go_and_ping_floods_are_cut(
    database_url: str,
) -> None:
    running = start_server(make_config(
        database_url, grpc_max_concurrent_streams=7, grpc_max_connection_idle_seconds=1,
    ))
    address = ("127.0.0.1", running.server.port)
    try:
        with socket.create_connection(address, timeout=30) as sock:
            sock.sendall(PREFACE + _frame(SETTINGS))
            frames = list(_frames_until_closed(sock))  # no call: idle from the start
        assert _announced_settings(frames).get(0x3) == 7
        assert GOAWAY in [k for k, _ in frames]  # told to go, then closed

        pings = b"".join(_frame(PING, 0, i.to_bytes(8, "big")) for i in range(6))
        with socket.create_connection(address, timeout=30) as sock:
            sock.sendall(PREFACE + _frame(SETTINGS))
            goaways = [p for k, p in _frames_until_closed(sock, pings) if k == GOAWAY]
        assert int.from_bytes(goaways[0][4:8], "big") == ENHANCE_YOUR_CALM, goaways
    finally:
        running.channel.close()
        running.server.stop(grace=1)
