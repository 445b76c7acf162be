"""The audit log: every change and its actor, for org admins, logged, pruned, secret-free."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
from conftest import RunningServer, bearer, make_config, start_server
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from rest_helpers import Rest, bearer_header, running_rest

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice_client.errors import error_from_rpc_error
from tokenservice_server.db import connection
from tokenservice_server.logs import JsonFormatter
from tokenservice_server.values import DAY_MICROS, Actor, AuditEntry

ADMIN_PERMISSIONS = ("api_token:manage", "api_token:admin", "pass:read")


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def events(ts: RunningServer, token: str, **filters) -> list[pb.AuditEvent]:
    """Every event the caller may see, following page tokens (pages of 2)."""
    out, page_token = [], ""
    while True:
        page = ts.stub.ListAuditEvents(
            pb.ListAuditEventsRequest(page_size=2, page_token=page_token, **filters),
            metadata=bearer(token), timeout=10,
        )
        out.extend(page.events)
        if not page.next_page_token:
            return out
        page_token = page.next_page_token


def create(ts: RunningServer, token: str, name: str = "svc", scopes=("pass:read",)):
    return ts.stub.CreateToken(pb.CreateTokenRequest(name=name, scopes=list(scopes)),
                               metadata=bearer(token), timeout=10)


@pytest.fixture
def admin(ts: RunningServer) -> str:
    return ts.manager("admin@acme.test", permissions=ADMIN_PERMISSIONS)


def test_each_token_change_is_recorded_with_who_and_from_where(
    ts: RunningServer, admin: str
) -> None:
    me = ts.authenticate(admin)
    made = create(ts, admin, name="ci")
    ts.stub.UpdateToken(pb.UpdateTokenRequest(
        api_token=pb.ApiToken(id=made.api_token.id, name="ci-2"),
        update_mask=FieldMask(paths=["name"])), metadata=bearer(admin))
    rotated = ts.stub.RotateToken(pb.RotateTokenRequest(
        id=made.api_token.id, grace_period=Duration(seconds=0)), metadata=bearer(admin))
    ts.stub.RevokeToken(pb.RevokeTokenRequest(id=rotated.api_token.id), metadata=bearer(admin))

    old = events(ts, admin, token_id=made.api_token.id)
    assert [e.action for e in old] == ["token.rotate", "token.update", "token.create"]
    new = events(ts, admin, token_id=rotated.api_token.id)
    assert [e.action for e in new] == ["token.revoke", "token.create"]
    for event in old + new:
        assert (event.actor_user_id, event.actor_email, event.actor_token_id) == (
            me.user_id, "admin@acme.test", me.token_id)
        assert event.client_address == "127.0.0.1" and event.org_id == "acme"
    rotate, update, create_event = old
    assert rotate.details["replaced_by_id"] == rotated.api_token.id
    assert rotate.details["grace_period_seconds"] == 0
    assert update.details["name"] == "ci-2"
    assert list(create_event.details["scopes"]) == ["pass:read"]
    assert new[1].details["rotated_from_id"] == made.api_token.id
    times = [e.time.ToMicroseconds() for e in events(ts, admin)]
    assert times == sorted(times, reverse=True), "newest first"


def test_user_changes_from_the_command_line_have_the_cli_actor(ts: RunningServer, admin) -> None:
    ts.add_user("temp@acme.test", "acme", ["pass:read"])
    ts.disable_user("temp@acme.test")
    with connection(ts.server.store.db):
        ts.server.service.enable_user("temp@acme.test")
        ts.server.service.set_permissions("temp@acme.test", ["pass:read", "invoice.view"])
    users = [e for e in events(ts, admin) if e.action.startswith("user.")
             and e.details["email"] == "temp@acme.test"]
    assert [e.action for e in users] == ["user.update", "user.enable", "user.disable", "user.add"]
    assert {(e.actor_email, e.actor_user_id, e.actor_token_id) for e in users} == {("cli", "", "")}
    assert list(users[0].details["added"]) == ["invoice.view"]


def test_an_old_secret_after_its_grace_fails_and_is_recorded_once(
    ts: RunningServer, admin
) -> None:
    old = create(ts, admin)
    graced = create(ts, admin)
    ts.stub.RotateToken(pb.RotateTokenRequest(id=old.api_token.id), metadata=bearer(admin))
    ts.stub.RotateToken(pb.RotateTokenRequest(id=graced.api_token.id,
                                              grace_period=Duration(seconds=3600)),
                        metadata=bearer(admin))
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as caught:
            ts.authenticate(old.token)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert caught.value.details() == "invalid, expired or revoked token"
        assert ts.authenticate(graced.token).token_id == graced.api_token.id  # within grace
    reuse = events(ts, admin, action="token.reuse_after_rotation")
    assert [e.token_id for e in reuse] == [old.api_token.id], "once a minute at most"
    assert reuse[0].actor_email == "" and reuse[0].client_address == "127.0.0.1"


def test_the_audit_log_is_for_org_admins_and_their_org_only(ts: RunningServer, admin) -> None:
    manager = ts.manager("manager@acme.test")
    error = rpc_error(ts.stub.ListAuditEvents, pb.ListAuditEventsRequest(),
                      metadata=bearer(manager))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    error = rpc_error(ts.stub.ListAuditEvents, pb.ListAuditEventsRequest())
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    evil = ts.manager("boss@evil.test", org="evil", permissions=ADMIN_PERMISSIONS)
    secret = create(ts, evil, name="evil's")
    seen = events(ts, admin)
    assert seen and all(e.org_id == "acme" for e in seen)
    assert events(ts, admin, token_id=secret.api_token.id) == []
    assert [e.action for e in events(ts, evil, token_id=secret.api_token.id)] == ["token.create"]


def test_filters_bind_page_tokens_and_bad_filters_are_named(ts: RunningServer, admin) -> None:
    for i in range(3):
        create(ts, admin, name=f"t{i}")
    page = ts.stub.ListAuditEvents(pb.ListAuditEventsRequest(page_size=1, action="token.create"),
                                   metadata=bearer(admin))
    assert page.events[0].action == "token.create" and page.next_page_token
    assert len(events(ts, admin, action="token.create")) == 4  # and the bootstrap token
    for request in (
        pb.ListAuditEventsRequest(page_token=page.next_page_token),
        pb.ListAuditEventsRequest(action="nope"),
        pb.ListAuditEventsRequest(token_id="not-a-uuid"),
        pb.ListAuditEventsRequest(page_size=-1),
    ):
        error = rpc_error(ts.stub.ListAuditEvents, request, metadata=bearer(admin))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(error_from_rpc_error(error).fields) == 1


def test_rest_lists_audit_events(ts: RunningServer, admin) -> None:
    made = create(ts, admin, name="rest")
    with running_rest(ts.target) as rest:
        rest: Rest
        r = rest.client.get("/api/v1/audit-events", params={"tokenId": made.api_token.id},
                            headers=bearer_header(admin))
        assert r.status_code == 200, r.text
        assert r.headers["cache-control"] == "no-store"
        [event] = r.json()["events"]
        assert event["action"] == "token.create" and event["tokenId"] == made.api_token.id
        assert event["details"]["name"] == "rest" and event["actorEmail"] == "admin@acme.test"
        assert r.json()["nextPageToken"] == ""
        r = rest.client.get("/api/v1/audit-events", params={"action": "token.zap"},
                            headers=bearer_header(admin))
        assert r.status_code == 422
        assert r.json()["error"]["details"][0]["field"] == "action"


def test_each_event_is_one_json_log_line_without_secrets(
    ts: RunningServer, admin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tokenservice.audit")
    made = create(ts, admin, name="logged")
    rotated = ts.stub.RotateToken(pb.RotateTokenRequest(id=made.api_token.id),
                                  metadata=bearer(admin))
    ts.stub.ReportLeakedTokens(pb.ReportLeakedTokensRequest(tokens=[rotated.token],
                                                            source="https://paste.test/1"))
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records
             if r.name == "tokenservice.audit"]
    assert [line["action"] for line in lines] == [
        "token.create", "token.rotate", "token.create", "token.leak_reported"]
    stored = {e.id: e for e in events(ts, admin)}
    for line in lines:
        event = stored[line["event_id"]]
        assert (line["token_id"], line["org_id"]) == (event.token_id, event.org_id)
    assert lines[-1]["details"] == {"source": "https://paste.test/1"}
    # No raw token or secret, in the log or in the table.
    with connection(ts.server.store.db):
        rows = ts.server.store.db.execute_sql("SELECT * FROM audit_events").fetchall()
    text = caplog.text + json.dumps(lines) + repr(rows)
    for raw in (admin, made.token, rotated.token):
        assert raw not in text and raw[16:48] not in text


@pytest.fixture
def pruned(database_url: str) -> Iterator[RunningServer]:
    running = start_server(make_config(database_url, audit_retention_days=30,
                                       audit_prune_seconds=0.1, audit_prune_batch=3))
    try:
        yield running
    finally:
        running.channel.close()
        running.server.stop(grace=1)


def test_events_past_the_retention_are_pruned_in_the_background(pruned: RunningServer) -> None:
    store = pruned.server.store
    now = time.time_ns() // 1000
    old = AuditEntry("user.update", "acme", Actor(email="cli"), details={"email": "x@acme.test"})
    with connection(store.db):
        for age_days in (400, 90, 31, 29, 1):
            for _ in range(4):  # more than a batch of each, so pruning takes several
                store.append_audit([old], now - age_days * DAY_MICROS)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with connection(store.db):
            left = store.list_audit_events(org_id="acme", after=None, limit=100)
        if len(left) == 8:
            break
        time.sleep(0.1)
    ages = sorted({(now - int(e.time.timestamp() * 1e6)) // DAY_MICROS for e in left})
    assert ages == [1, 29], "only the events inside the retention are left"
    assert all(uuid.UUID(e.id) for e in left)
