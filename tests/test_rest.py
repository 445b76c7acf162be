"""The REST/JSON shim end to end: real HTTP to uvicorn, real gRPC to a real tokenservice."""

from __future__ import annotations

import base64
import json
import logging
import re
import socket
import subprocess
import threading
from collections.abc import Iterator

import httpx
import pytest
from conftest import make_config, start_server
from grpc_health.v1 import health_pb2
from rest_helpers import FUTURE, Rest, bearer_header, running_rest

from tokenservice_server.rest import RestLimits, RestServer

# Request bodies as two public API-token guides print them in their curl
# examples: callers copy these, so they must work on our paths as printed.
STEMP_CREATE_BODY = """{
    "name": "POS Integration",
    "scopes": ["pass:read", "pass:create", "loyalty:manage"],
    "expiresAt": "2026-12-31T23:59:59Z"
  }"""
STORNO_CREATE_BODY = """{
    "name": "CI/CD Pipeline",
    "scopes": ["invoice.view", "invoice.create", "client.view"],
    "expiresAt": "2027-01-01T00:00:00Z"
  }"""
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
API_TOKEN_FIELDS = {
    "id", "name", "tokenPrefix", "scopes", "expiresAt", "lastUsedAt", "revokedAt",
    "createdAt", "createdByEmail", "orgId", "state", "rotatedFromId", "replacedById",
    "rateLimit", "parentId",
}


@pytest.fixture
def rest(ts) -> Iterator[Rest]:
    with running_rest(ts.target) as running:
        yield running


@pytest.fixture
def manager(ts) -> str:
    return ts.manager()


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in response.text
    return body["error"]


# -- the routes ------------------------------------------------------------


def test_create_answers_201_with_the_raw_token_once(rest: Rest, manager: str) -> None:
    r = rest.create(manager, name="POS Integration", scopes=["pass:read"], expiresAt=FUTURE)
    assert r.status_code == 201, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert set(body) == {"token", "apiToken"}
    token, meta = body["token"], body["apiToken"]
    assert set(meta) == API_TOKEN_FIELDS
    assert token.startswith("tks_") and meta["tokenPrefix"] == token[:12]
    assert meta["name"] == "POS Integration" and meta["scopes"] == ["pass:read"]
    assert meta["expiresAt"] == FUTURE
    assert meta["lastUsedAt"] is None and meta["revokedAt"] is None
    assert RFC3339_UTC.match(meta["createdAt"])
    assert meta["createdByEmail"] == "manager@acme.test" and meta["orgId"] == "acme"

    listed = rest.client.get("/api/v1/api-tokens", headers=bearer_header(manager))
    assert token not in listed.text
    fetched = rest.client.get(f"/api/v1/api-tokens/{meta['id']}", headers=bearer_header(manager))
    assert fetched.status_code == 200 and token not in fetched.text
    assert fetched.json()["id"] == meta["id"]


def test_unset_timestamps_are_null_and_repeated_fields_present(rest: Rest, manager: str) -> None:
    created = rest.create(manager).json()
    assert created["apiToken"]["expiresAt"] is None
    who = rest.client.post("/api/v1/authenticate", json={"token": created["token"]})
    assert who.status_code == 200, who.text
    assert who.json() == {
        "tokenId": created["apiToken"]["id"],
        "userId": who.json()["userId"],
        "userEmail": "manager@acme.test",
        "orgId": "acme",
        "scopes": ["pass:read"],
        "expiresAt": None,
        # The service default, 600 per minute (int64: a JSON string, as proto3 has it).
        "rateLimit": {"limit": "600", "remaining": "599",
                      "resetTime": who.json()["rateLimit"]["resetTime"]},
    }


def test_list_paginates_with_camel_and_snake_case_query(rest: Rest, manager: str) -> None:
    ids = [rest.create(manager, name=f"t{i}").json()["apiToken"]["id"] for i in range(3)]
    h = bearer_header(manager)
    first = rest.client.get("/api/v1/api-tokens", params={"pageSize": 2}, headers=h).json()
    assert len(first["tokens"]) == 2 and first["nextPageToken"]
    second = rest.client.get(
        "/api/v1/api-keys", params={"page_size": 2, "page_token": first["nextPageToken"]},
        headers=h,
    ).json()
    seen = [t["id"] for t in first["tokens"] + second["tokens"]]
    assert set(ids) <= set(seen)
    assert second["nextPageToken"] == "" or len(second["tokens"]) == 2
    bad = rest.client.get("/api/v1/api-tokens", params={"pageToken": "nope"}, headers=h)
    assert_error(bad, 422, "validation_error")
    # Well-formed but forged: a created_at past 2**63 (it was a 500 on SQLite).
    forged = base64.urlsafe_b64encode(f"1:{2**63}:{'0' * 32}".encode()).decode().rstrip("=")
    bad = rest.client.get("/api/v1/api-tokens", params={"pageToken": forged}, headers=h)
    assert assert_error(bad, 422, "validation_error")["details"][0]["field"] == "pageToken"
    bad = rest.client.get("/api/v1/api-tokens", params={"pageSize": "many"}, headers=h)
    assert assert_error(bad, 422, "validation_error")["details"][0]["field"] == "pageSize"
    bad = rest.client.get("/api/v1/api-tokens", params={"colour": "red"}, headers=h)
    assert assert_error(bad, 422, "validation_error")["details"][0]["field"] == "colour"


def test_revoke_sets_revoked_at_is_idempotent_and_stops_authentication(
    rest: Rest, manager: str
) -> None:
    created = rest.create(manager).json()
    path = f"/api/v1/api-tokens/{created['apiToken']['id']}"
    assert rest.client.post("/api/v1/authenticate", json={"token": created["token"]}).is_success
    first = rest.client.delete(path, headers=bearer_header(manager))
    assert first.status_code == 200, first.text
    assert first.headers["cache-control"] == "no-store"
    assert RFC3339_UTC.match(first.json()["revokedAt"])
    again = rest.client.delete(
        path.replace("api-tokens", "api-keys"), headers=bearer_header(manager)
    )
    assert again.status_code == 200 and again.json()["revokedAt"] == first.json()["revokedAt"]
    denied = rest.client.post("/api/v1/authenticate", json={"token": created["token"]})
    assert_error(denied, 401, "unauthorized")
    listed = rest.client.get("/api/v1/api-tokens", headers=bearer_header(manager)).json()
    assert any(t["id"] == created["apiToken"]["id"] and t["revokedAt"] for t in listed["tokens"])


def test_scopes_need_no_credentials(rest: Rest) -> None:
    r = rest.client.get("/api/v1/scopes")
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    scopes = {s["name"]: s for s in r.json()["scopes"]}
    assert scopes["api_token:manage"] == {
        "name": "api_token:manage",
        "description": "create, list and revoke API tokens",
        "apiOnly": True,
    }
    assert scopes["pass:read"]["apiOnly"] is False


def test_authorization_scheme_is_case_insensitive(rest: Rest, manager: str) -> None:
    for header in (f"bearer {manager}", f"BEARER   {manager}", f"bEaReR {manager}"):
        r = rest.client.get("/api/v1/api-tokens", headers={"Authorization": header})
        assert r.status_code == 200, (header, r.text)
    r = rest.client.get("/api/v1/api-tokens", headers={"Authorization": f"Basic {manager}"})
    assert_error(r, 401, "unauthorized")


def test_credentials_in_the_query_string_are_refused(rest: Rest, manager: str) -> None:
    for params in ({"access_token": manager}, {"token": manager}, {"api_key": manager}):
        r = rest.client.get("/api/v1/api-tokens", params=params)
        assert_error(r, 401, "unauthorized")
        # Even beside a good header: the URL leaked the secret, so the request fails.
        r = rest.client.get("/api/v1/api-tokens", params=params, headers=bearer_header(manager))
        assert_error(r, 401, "unauthorized")
    r = rest.client.post("/api/v1/authenticate", params={"token": manager}, json={})
    assert_error(r, 401, "unauthorized")


# -- errors ------------------------------------------------------------------


def test_validation_errors_name_fields_by_their_json_names(rest: Rest, manager: str) -> None:
    r = rest.create(manager, scopes=["no:such-scope"], expiresAt="2001-01-01T00:00:00Z")
    error = assert_error(r, 422, "validation_error")
    fields = {d["field"] for d in error["details"]}
    assert "expiresAt" in fields and any(f.startswith("scopes") for f in fields)
    assert all(set(d) == {"field", "description"} and d["description"] for d in error["details"])
    assert "expires_at" not in r.text


def test_unknown_field_is_422_and_creates_nothing(rest: Rest, manager: str) -> None:
    r = rest.create(manager, expireAt=FUTURE)
    error = assert_error(r, 422, "validation_error")
    assert error["details"] == [{"field": "expireAt", "description": "unknown field"}]
    listed = rest.client.get("/api/v1/api-tokens", headers=bearer_header(manager)).json()
    assert [t["name"] for t in listed["tokens"]] == ["bootstrap"]


@pytest.mark.parametrize(
    ("first", "second"), [("expires_at", "expiresAt"), ("expiresAt", "expires_at")]
)
def test_two_spellings_of_one_field_are_422_naming_it(
    rest: Rest, manager: str, first: str, second: str
) -> None:
    """Whichever spelling comes last, the body is refused: no token without expiry."""
    body = {"name": "n", "scopes": ["pass:read"], first: FUTURE, second: None}
    r = rest.client.post("/api/v1/api-tokens", json=body, headers=bearer_header(manager))
    error = assert_error(r, 422, "validation_error")
    assert [d["field"] for d in error["details"]] == ["expiresAt"]
    listed = rest.client.get("/api/v1/api-tokens", headers=bearer_header(manager)).json()
    assert [t["name"] for t in listed["tokens"]] == ["bootstrap"]


@pytest.mark.parametrize(
    "body",
    [
        {"name": "n", "scopes": [f"no:such-scope-{i:03}" for i in range(300)]},
        {"name": "n", "scopes": ["x" * 20_000]},
        {"name": "n", "scopes": ["pass:read"], **{f"field{i:03}": 1 for i in range(300)}},
        {"name": "n", "scopes": ["pass:read"], "y" * 20_000: 1},
    ],
    ids=["300-unknown-scopes", "20kb-scope", "300-unknown-fields", "20kb-field-name"],
)
def test_a_huge_validation_error_stays_422_and_echoes_little(
    rest: Rest, manager: str, body: dict
) -> None:
    r = rest.client.post("/api/v1/api-tokens", json=body, headers=bearer_header(manager))
    error = assert_error(r, 422, "validation_error")
    assert 1 <= len(error["details"]) <= 10
    assert len(r.content) < 4096


def test_bad_values_are_422_with_the_field(rest: Rest, manager: str) -> None:
    r = rest.create(manager, expiresAt="next tuesday")
    error = assert_error(r, 422, "validation_error")
    assert error["details"][0]["field"] == "expiresAt"
    r = rest.create(manager, scopes="pass:read")
    assert assert_error(r, 422, "validation_error")["details"][0]["field"] == "scopes"
    # Inside a nested message, the field itself is named, not the message around it.
    for limit, field in (({"requests": 99999999999, "period": "60s"}, "rateLimit.requests"),
                         ({"requests": 5.5, "period": "60s"}, "rateLimit.requests"),
                         ({"requests": 5, "period": "abc"}, "rateLimit.period")):
        r = rest.create(manager, rateLimit=limit)
        details = assert_error(r, 422, "validation_error")["details"]
        assert [d["field"] for d in details] == [field], details


def test_a_patch_names_a_bad_nested_value_from_the_top_of_its_body(
    rest: Rest, manager: str
) -> None:
    made = rest.create(manager).json()["apiToken"]
    r = rest.client.patch(f"/api/v1/api-tokens/{made['id']}",
                          json={"rateLimit": {"requests": 5, "period": "soon"}},
                          headers=bearer_header(manager))
    details = assert_error(r, 422, "validation_error")["details"]
    assert [d["field"] for d in details] == ["rateLimit.period"]


@pytest.mark.parametrize(
    "content",
    [b"{", b"[1, 2]", b"null", b'"x"', b'{"name": "a", "name": "b"}', b'{"name": NaN}',
     b"\xff\xfe"],
)
def test_malformed_json_is_422(rest: Rest, manager: str, content: bytes) -> None:
    r = rest.client.post(
        "/api/v1/api-tokens", content=content,
        headers={**bearer_header(manager), "Content-Type": "application/json"},
    )
    assert_error(r, 422, "validation_error")


def test_wrong_content_type_is_415(rest: Rest, manager: str) -> None:
    for content_type in ("text/plain", "application/x-www-form-urlencoded",
                         "application/json; charset=latin-1"):
        r = rest.client.post(
            "/api/v1/api-tokens", content=b'{"name": "x", "scopes": ["pass:read"]}',
            headers={**bearer_header(manager), "Content-Type": content_type},
        )
        assert_error(r, 415, "validation_error")
    r = rest.client.post(
        "/api/v1/api-tokens", content=b'{"name": "x", "scopes": ["pass:read"]}',
        headers={**bearer_header(manager), "Content-Type": "application/json; charset=utf-8"},
    )
    assert r.status_code == 201


def test_body_over_64_kib_is_413(rest: Rest, manager: str) -> None:
    body = json.dumps({"name": "x" * (64 * 1024), "scopes": ["pass:read"]}).encode()
    r = rest.client.post(
        "/api/v1/api-tokens", content=body,
        headers={**bearer_header(manager), "Content-Type": "application/json"},
    )
    assert_error(r, 413, "validation_error")

    def chunks():  # no Content-Length: the limit holds while streaming too
        yield body[:40000]
        yield body[40000:]

    r = rest.client.post(
        "/api/v1/api-tokens", content=chunks(),
        headers={**bearer_header(manager), "Content-Type": "application/json"},
    )
    assert_error(r, 413, "validation_error")
    just_fits = {"name": "ok", "scopes": ["pass:read"], "expiresAt": None}
    padded = json.dumps(just_fits).encode()
    padded += b" " * (64 * 1024 - len(padded))
    r = rest.client.post(
        "/api/v1/api-tokens", content=padded,
        headers={**bearer_header(manager), "Content-Type": "application/json"},
    )
    assert r.status_code == 201, r.text


def test_unknown_path_is_404_and_wrong_method_405_with_allow(rest: Rest) -> None:
    for path in ("/nope", "/api/v1/api-tokens/", "/api/v1/api-tokens/a/b", "/api/v2/scopes"):
        assert_error(rest.client.get(path), 404, "not_found")
    r = rest.client.put("/api/v1/api-tokens")
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "GET, POST"
    r = rest.client.post("/api/v1/api-tokens/some-id")
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, PATCH"
    r = rest.client.delete("/api/v1/scopes")
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    r = rest.client.post("/healthz")
    assert r.status_code == 405 and r.headers["allow"] == "GET"


def test_missing_credentials_401_missing_permission_403_other_users_token_404(
    ts, rest: Rest, manager: str
) -> None:
    r = rest.client.get("/api/v1/api-tokens")
    assert_error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    assert_error(rest.create("tks_not_a_real_token"), 401, "unauthorized")
    ts.add_user("reader@acme.test", permissions=("pass:read",))
    reader = ts.mint("reader@acme.test", scopes=("pass:read",))
    assert_error(rest.create(reader), 403, "forbidden")
    other = ts.manager(email="other@acme.test")
    mine = rest.create(manager).json()["apiToken"]["id"]
    r = rest.client.get(f"/api/v1/api-tokens/{mine}", headers=bearer_header(other))
    assert_error(r, 404, "not_found")
    r = rest.client.delete(f"/api/v1/api-tokens/{mine}", headers=bearer_header(other))
    assert_error(r, 404, "not_found")


def test_expired_deadline_is_500_without_internals(rest: Rest, manager: str) -> None:
    r = rest.client.get(
        "/api/v1/api-tokens", headers={**bearer_header(manager), "grpc-timeout": "1n"}
    )
    error = assert_error(r, 500, "internal_error")
    assert "deadline" not in error["message"].lower()
    r = rest.client.get("/api/v1/scopes", headers={"grpc-timeout": "soon"})
    assert_error(r, 422, "validation_error")
    r = rest.client.get("/api/v1/scopes", headers={"grpc-timeout": "20S"})
    assert r.status_code == 200


def test_unreachable_grpc_server_is_503(tmp_path) -> None:
    from conftest import free_port

    with running_rest(f"127.0.0.1:{free_port()}") as rest:
        r = rest.client.get("/api/v1/scopes", headers={"grpc-timeout": "2S"})
        error = assert_error(r, 503, "unavailable")
        assert "127.0.0.1" not in error["message"]
        assert_error(rest.client.get("/healthz"), 503, "unavailable")


def test_throttled_client_gets_429_with_retry_after_per_real_address(database_url) -> None:
    config = make_config(
        database_url, auth_failure_burst=3, auth_failure_refill_per_second=0.01,
        lookup_failure_burst=1000,
    )
    running = start_server(config)
    try:
        with running_rest(running.target) as rest:
            def attempt(address: str) -> httpx.Response:
                transport = httpx.HTTPTransport(local_address=address)
                with httpx.Client(base_url=rest.base_url, transport=transport) as client:
                    return client.post("/api/v1/authenticate", json={"token": "tks_bogus"})

            statuses = [attempt("127.0.0.2").status_code for _ in range(6)]
            assert statuses[0] == 401 and statuses[-1] == 429, statuses
            limited = attempt("127.0.0.2")
            assert_error(limited, 429, "rate_limited")
            assert int(limited.headers["retry-after"]) >= 1
            # Another client address is not throttled: the shim passed the real one on.
            assert_error(attempt("127.0.0.3"), 401, "unauthorized")
    finally:
        running.channel.close()
        running.server.stop(grace=1)


def test_a_shim_dialing_grpc_over_ipv6_still_passes_the_real_client_on(database_url) -> None:
    """`serve --host localhost` may connect the shim over [::1]: its x-forwarded-for
    must still be honoured, or every REST client shares one throttle bucket."""
    config = make_config(
        database_url, host="::1", auth_failure_burst=2, auth_failure_refill_per_second=0.01,
    )
    running = start_server(config)
    try:
        server = RestServer(f"[::1]:{running.server.port}", "127.0.0.1", 0)
        server.start()
        try:
            def attempt(address: str) -> int:
                transport = httpx.HTTPTransport(local_address=address)
                with httpx.Client(base_url=f"http://127.0.0.1:{server.port}",
                                  transport=transport) as client:
                    r = client.post("/api/v1/authenticate", json={"token": "tks_bogus"})
                    return r.status_code

            assert [attempt("127.0.0.2") for _ in range(3)] == [401, 401, 429]
            assert attempt("127.0.0.3") == 401
        finally:
            server.stop(grace=1)
    finally:
        running.channel.close()
        running.server.stop(grace=1)


# -- slow and idle clients -------------------------------------------------------


def _status_before_close(sock: socket.socket) -> bytes:
    """The status line sent before the server closed (b"" if none); the socket's
    timeout bounds a failure, it measures nothing."""
    data = b""
    with sock:
        try:
            while chunk := sock.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
    return data.split(b"\r\n", 1)[0]


def test_idle_slow_and_greedy_connections_are_closed(ts, caplog) -> None:
    limits = RestLimits(max_connections=6, header_timeout=1.0, body_timeout=1.0,
                        idle_timeout=1.0)
    server = RestServer(ts.target, "127.0.0.1", 0, limits=limits)
    server.start()
    try:
        def connect(data: bytes = b"") -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            if data:
                sock.sendall(data)
            return sock

        idle = connect()
        headers = connect(b"POST /api/v1/authenticate HTTP/1.1\r\nHost: ts\r\n")
        body = connect(b"POST /api/v1/authenticate HTTP/1.1\r\nHost: ts\r\n"
                       b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        kept = connect(b"GET /api/v1/scopes HTTP/1.1\r\nHost: ts\r\n\r\n")
        huge = connect(b"GET /api/v1/scopes HTTP/1.1\r\nX-Pad: " + b"a" * 70_000 + b"\r\n\r\n")
        assert _status_before_close(huge) == b"HTTP/1.1 431 Request Header Fields Too Large"
        # A header a byte at a time does not stretch the deadline.
        trickle = connect(b"P")
        with pytest.raises(OSError):
            for byte in b"OST /api/v1/authenticate HTTP/1.1\r\nHost: ts\r\n" * 40:
                trickle.sendall(bytes([byte]))
                threading.Event().wait(0.05)
        assert _status_before_close(trickle) in (b"HTTP/1.1 408 Request Timeout", b"")
        assert _status_before_close(idle) == b""
        assert _status_before_close(headers) == b"HTTP/1.1 408 Request Timeout"
        assert _status_before_close(body) == b""
        assert _status_before_close(kept) == b"HTTP/1.1 200 OK"  # then idle, then closed
        # The cap: six open at once, the seventh refused at once.
        held = [connect() for _ in range(6)]
        assert _status_before_close(connect()) in (b"HTTP/1.1 503 Service Unavailable", b"")
        for sock in held:
            sock.close()
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as client:
            assert client.get("/api/v1/scopes").status_code == 200
    finally:
        server.stop(grace=1)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- health and OpenAPI --------------------------------------------------------


def test_healthz_follows_the_grpc_health_service(ts, rest: Rest) -> None:
    r = rest.client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "SERVING", "dependencies": {"database": "up"}}
    ts.server.probe.stop()  # the probe stops and reports NOT_SERVING, as when the DB is gone
    assert ts.health_status() == health_pb2.HealthCheckResponse.NOT_SERVING
    assert_error(rest.client.get("/healthz"), 503, "unavailable")



def test_openapi_document_covers_every_route(rest: Rest) -> None:
    r = rest.client.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"] == "3.1.0"
    paths = doc["paths"]
    assert set(paths["/api/v1/api-tokens"]) == {"get", "post"}
    assert set(paths["/api/v1/api-keys"]) == {"get", "post"}
    # PATCH binds {api_token.id}: one URL shape, documented as one path.
    assert set(paths["/api/v1/api-tokens/{id}"]) == {"get", "delete", "patch"}
    assert set(paths["/api/v1/api-keys/{id}"]) == {"get", "delete", "patch"}
    assert set(paths["/api/v1/api-tokens/{id}:rotate"]) == {"post"}
    assert set(paths["/api/v1/audit-events"]) == {"get"}
    assert set(paths["/api/v1/leaked-tokens"]) == {"post"}
    assert paths["/api/v1/leaked-tokens"]["post"]["security"] == [{}, {"bearerAuth": []}]
    assert set(paths["/api/v1/authenticate"]) == {"post"}
    assert set(paths["/api/v1/scopes"]) == {"get"}
    create = paths["/api/v1/api-tokens"]["post"]
    assert "201" in create["responses"] and "200" not in create["responses"]
    for status in ("401", "403", "404", "413", "415", "422", "429", "500", "503"):
        schema = create["responses"][status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/Error"}
    params = {p["name"]: p for p in paths["/api/v1/api-tokens"]["get"]["parameters"]}
    assert set(params) == {"pageSize", "pageToken", "state", "notUsedSince"}
    assert params["state"]["schema"]["enum"] == [
        "STATE_UNSPECIFIED", "ACTIVE", "EXPIRED", "REVOKED"]
    assert params["pageSize"]["schema"]["type"] == "integer"
    assert paths["/api/v1/api-tokens/{id}"]["get"]["parameters"][0]["in"] == "path"
    schemas = doc["components"]["schemas"]
    assert set(schemas["ApiToken"]["required"]) == API_TOKEN_FIELDS
    assert schemas["ApiToken"]["properties"]["expiresAt"]["type"] == ["string", "null"]
    assert "expiresAt" in schemas["CreateTokenRequestInput"]["properties"]
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearerAuth"]["description"],
    }


# -- the guides' curl examples, on our paths, through the curl binary ---------


def curl(rest: Rest, *args: str) -> tuple[int, dict[str, str], str]:
    out = subprocess.run(
        ["curl", "-sS", "-i", "--max-time", "30", *args], capture_output=True, check=True,
        stdin=subprocess.DEVNULL,
    ).stdout.decode()
    head, _, body = out.partition("\r\n\r\n")
    lines = head.split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


def test_guide_examples_replayed_through_curl(ts, rest: Rest) -> None:
    # stemp: create on /api/v1/api-keys, list, revoke, as its guide shows.
    token = ts.manager(
        email="you@example.com",
        permissions=("api_token:manage", "pass:read", "pass:create", "loyalty:manage"),
    )
    guide_body = json.loads(STEMP_CREATE_BODY)
    assert guide_body["name"] == "POS Integration" and guide_body["expiresAt"].endswith("Z")
    guide_body["expiresAt"] = FUTURE  # the guide's date is near; the rule wants a future one
    status, headers, text = curl(
        rest, "-X", "POST", f"{rest.base_url}/api/v1/api-keys",
        "-H", f"Authorization: Bearer {token}", "-H", "Content-Type: application/json",
        "-d", json.dumps(guide_body),
    )
    assert status == 201, text
    assert headers["cache-control"] == "no-store"
    created = json.loads(text)
    assert created["apiToken"]["scopes"] == ["pass:read", "pass:create", "loyalty:manage"]
    assert created["apiToken"]["lastUsedAt"] is None
    assert created["apiToken"]["createdByEmail"] == "you@example.com"

    status, headers, text = curl(
        rest, "-X", "GET", f"{rest.base_url}/api/v1/api-keys",
        "-H", f"Authorization: Bearer {token}",
    )
    assert status == 200 and created["token"] not in text
    listed = json.loads(text)["tokens"]
    assert {"name", "tokenPrefix", "scopes", "lastUsedAt"} <= set(listed[0])

    token_id = created["apiToken"]["id"]
    status, _, text = curl(
        rest, "-X", "DELETE", f"{rest.base_url}/api/v1/api-keys/{token_id}",
        "-H", f"Authorization: Bearer {token}",
    )
    assert status == 200 and json.loads(text)["revokedAt"]
    # "All requests using the revoked token will return 401 Unauthorized."
    status, _, _ = curl(
        rest, f"{rest.base_url}/api/v1/api-keys",
        "-H", f"Authorization: Bearer {created['token']}",
    )
    assert status == 401

    # storno: create on /api/v1/api-tokens with its invoice scopes.
    storno_token = ts.manager(
        email="storno@acme.test",
        permissions=("api_token:manage", "invoice.view", "invoice.create", "client.view"),
    )
    guide_body = json.loads(STORNO_CREATE_BODY)
    guide_body["expiresAt"] = FUTURE
    status, _, text = curl(
        rest, "-X", "POST", f"{rest.base_url}/api/v1/api-tokens",
        "-H", f"Authorization: Bearer {storno_token}", "-H", "Content-Type: application/json",
        "-d", json.dumps(guide_body),
    )
    assert status == 201, text
    created = json.loads(text)
    assert created["apiToken"]["name"] == "CI/CD Pipeline"
    assert created["apiToken"]["tokenPrefix"] == created["token"][:12]
    assert created["apiToken"]["revokedAt"] is None


def test_empty_body_is_the_empty_message(rest: Rest) -> None:
    r = rest.client.post("/api/v1/authenticate")
    assert_error(r, 401, "unauthorized")


def test_a_stalled_request_does_not_block_others(rest: Rest, manager: str) -> None:
    import threading

    release = threading.Event()
    result: dict[str, httpx.Response] = {}

    def body():
        yield b'{"name": "slow", '
        release.wait(30)
        yield b'"scopes": ["pass:read"]}'

    def send() -> None:
        with httpx.Client(base_url=rest.base_url, timeout=30) as other:
            result["r"] = other.post(
                "/api/v1/api-tokens", content=body(),
                headers={**bearer_header(manager), "Content-Type": "application/json"},
            )

    sender = threading.Thread(target=send)
    sender.start()
    try:
        for _ in range(5):  # answered while the first request is still open
            assert rest.client.get("/api/v1/scopes").status_code == 200
            assert rest.create(manager).status_code == 201
        assert "r" not in result
    finally:
        release.set()
        sender.join(30)
    assert result["r"].status_code == 201
