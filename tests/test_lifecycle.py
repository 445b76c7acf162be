"""Token lifecycle through a real server: the token tree, rotation, update, state and filters.

Each rule is exercised over gRPC, and over REST (the shim in front of the same
server) where the REST face adds something of its own: a query flag, a verb,
a PATCH whose body keys are the update mask, 409 for a refused state change.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from conftest import RunningServer, bearer
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp
from rest_helpers import Rest, bearer_header, running_rest

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice_client.errors import error_from_rpc_error
from tokenservice_server.db import connection
from tokenservice_server.models import ApiToken

ALL = ("api_token:manage", "api_token:admin", "pass:read", "pass:create", "invoice.view")


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def fields(error: grpc.RpcError) -> list[str]:
    return error_from_rpc_error(error).fields


def stamp(when: datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(when)
    return value


def later(**delta: float) -> datetime:
    return datetime.now(UTC).replace(microsecond=0) + timedelta(**delta)


def create(ts: RunningServer, token: str, name: str = "svc", scopes=("pass:read",), **kw):
    return ts.stub.CreateToken(
        pb.CreateTokenRequest(name=name, scopes=list(scopes), **kw), metadata=bearer(token),
        timeout=10,
    )


def get(ts: RunningServer, token: str, token_id: str) -> pb.ApiToken:
    return ts.stub.GetToken(pb.GetTokenRequest(id=token_id), metadata=bearer(token), timeout=10)


def works(ts: RunningServer, raw: str) -> bool:
    try:
        ts.authenticate(raw)
        return True
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        return False


def set_expiry(ts: RunningServer, token_id: str, when: datetime) -> None:
    """Moves a token's expiry straight in the store (into the past, which no RPC may)."""
    with connection(ts.server.store.db):
        ApiToken.update(expires_at=when).where(ApiToken.id == uuid.UUID(token_id)).execute()


@pytest.fixture
def admin(ts: RunningServer) -> str:
    """A bootstrap token (made by the CLI path: no parent, no expiry) holding every scope used."""
    return ts.manager("admin@acme.test", permissions=ALL)


@pytest.fixture
def rest(ts: RunningServer) -> Iterator[Rest]:
    with running_rest(ts.target) as running:
        yield running


# The token tree.


def test_a_token_records_its_parent_and_the_cli_makes_roots(ts: RunningServer, admin) -> None:
    root = ts.stub.ListTokens(pb.ListTokensRequest(), metadata=bearer(admin)).tokens[0]
    assert root.parent_id == ""
    child = create(ts, admin, scopes=["api_token:manage", "pass:read"])
    assert child.api_token.parent_id == root.id
    grandchild = create(ts, child.token)
    assert grandchild.api_token.parent_id == child.api_token.id


def test_a_child_never_expires_later_than_its_parent(ts: RunningServer, admin) -> None:
    short = create(ts, admin, scopes=["api_token:manage", "pass:read"],
                   expires_at=stamp(later(hours=1))).token
    for expiry in (None, later(hours=2), later(days=36500)):
        kw = {} if expiry is None else {"expires_at": stamp(expiry)}
        error = rpc_error(create, ts, short, **kw)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fields(error) == ["expires_at"], error.details()
    half_hour = later(minutes=30)
    ok = create(ts, short, expires_at=stamp(half_hour))
    assert ok.api_token.expires_at.ToDatetime(tzinfo=UTC) == half_hour
    # Exactly the parent's expiry is allowed.
    parent_expiry = get(ts, admin, ok.api_token.parent_id).expires_at
    assert create(ts, short, expires_at=parent_expiry).api_token.expires_at == parent_expiry


def test_plain_revoke_stays_plain_and_revoke_children_takes_the_subtree(
    ts: RunningServer, admin
) -> None:
    boot = create(ts, admin, name="bootstrap", scopes=["api_token:manage", "pass:read"])
    prod = create(ts, boot.token, name="prod", scopes=["api_token:manage", "pass:read"])
    leaf = create(ts, prod.token, name="leaf")
    sibling = create(ts, admin, name="sibling")

    # Revoking the old bootstrap token does not take production down.
    revoked = ts.stub.RevokeToken(pb.RevokeTokenRequest(id=boot.api_token.id),
                                  metadata=bearer(admin))
    assert revoked.state == pb.ApiToken.REVOKED
    assert not works(ts, boot.token)
    assert works(ts, prod.token) and works(ts, leaf.token)

    # With revoke_children, the subtree goes in one call, even from a revoked root.
    again = ts.stub.RevokeToken(
        pb.RevokeTokenRequest(id=boot.api_token.id, revoke_children=True), metadata=bearer(admin)
    )
    assert again.revoked_at == revoked.revoked_at  # the root itself is unchanged
    assert not works(ts, prod.token) and not works(ts, leaf.token)
    assert works(ts, sibling.token) and works(ts, admin)
    for token_id in (prod.api_token.id, leaf.api_token.id):
        assert get(ts, admin, token_id).state == pb.ApiToken.REVOKED


def test_rest_revoke_children_is_a_query_flag(ts: RunningServer, rest: Rest, admin) -> None:
    parent = create(ts, admin, scopes=["api_token:manage", "pass:read"])
    child = create(ts, parent.token)
    plain = rest.client.delete(f"/api/v1/api-tokens/{parent.api_token.id}",
                               headers=bearer_header(admin))
    assert plain.status_code == 200 and plain.json()["state"] == "REVOKED"
    assert works(ts, child.token)
    tree = rest.client.delete(f"/api/v1/api-keys/{parent.api_token.id}",
                              params={"revokeChildren": "true"}, headers=bearer_header(admin))
    assert tree.status_code == 200, tree.text
    assert not works(ts, child.token)


def test_revoking_a_subtree_is_one_transaction(ts: RunningServer, admin) -> None:
    """All or nothing: a subtree is revoked in one commit, so no reader sees half of it."""
    parent = create(ts, admin, scopes=["api_token:manage", "pass:read"])
    children = [create(ts, parent.token, name=f"c{i}") for i in range(5)]
    ts.stub.RevokeToken(pb.RevokeTokenRequest(id=parent.api_token.id, revoke_children=True),
                        metadata=bearer(admin))
    times = {get(ts, admin, c.api_token.id).revoked_at.ToMicroseconds() for c in children}
    times.add(get(ts, admin, parent.api_token.id).revoked_at.ToMicroseconds())
    assert len(times) == 1, "every token of the subtree carries the one revocation time"


# Rotation.


def rotate(ts: RunningServer, token: str, token_id: str, seconds: int = 3600):
    return ts.stub.RotateToken(
        pb.RotateTokenRequest(id=token_id, grace_period=Duration(seconds=seconds)),
        metadata=bearer(token), timeout=10,
    )


def test_rotation_with_grace_links_both_ways_and_inherits_everything(
    ts: RunningServer, admin
) -> None:
    limit = pb.RateLimit(requests=100, period=Duration(seconds=60))
    old = create(ts, admin, name="ci", scopes=["api_token:manage", "pass:read"],
                 expires_at=stamp(later(days=30)), rate_limit=limit)
    child = create(ts, old.token, expires_at=stamp(later(days=1)))
    before = datetime.now(UTC)
    rotated = rotate(ts, admin, old.api_token.id, seconds=3600)
    new, previous = rotated.api_token, rotated.previous

    assert rotated.token != old.token and new.id != old.api_token.id
    assert new.rotated_from_id == old.api_token.id and previous.replaced_by_id == new.id
    assert (new.name, list(new.scopes), new.expires_at, new.rate_limit) == (
        "ci", ["api_token:manage", "pass:read"], old.api_token.expires_at, limit)
    assert new.created_by_email == "admin@acme.test" and new.parent_id == old.api_token.parent_id
    assert new.state == previous.state == pb.ApiToken.ACTIVE
    grace_end = previous.expires_at.ToDatetime(tzinfo=UTC)
    assert before + timedelta(seconds=3599) <= grace_end <= datetime.now(UTC) + timedelta(
        seconds=3600)
    # Both work during the grace; the old token's children now hang under the new one.
    assert works(ts, old.token) and works(ts, rotated.token)
    assert get(ts, admin, child.api_token.id).parent_id == new.id
    # A replaced token cannot be rotated again: 409 material.
    error = rpc_error(rotate, ts, admin, old.api_token.id)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already rotated" in error.details()


def test_grace_never_lengthens_a_life(ts: RunningServer, admin) -> None:
    old = create(ts, admin, expires_at=stamp(later(minutes=10)))
    previous = rotate(ts, admin, old.api_token.id, seconds=7 * 86400).previous
    assert previous.expires_at == old.api_token.expires_at


def test_grace_zero_revokes_at_once(ts: RunningServer, admin) -> None:
    old = create(ts, admin)
    rotated = rotate(ts, admin, old.api_token.id, seconds=0)
    assert rotated.previous.state == pb.ApiToken.REVOKED
    assert rotated.previous.HasField("revoked_at")
    assert not works(ts, old.token) and works(ts, rotated.token)


@pytest.mark.parametrize("grace", [
    Duration(seconds=-1),
    Duration(seconds=7 * 86400 + 1),
    Duration(nanos=-1),  # a nanosecond either side of the range is outside it
    Duration(seconds=7 * 86400, nanos=1),
    Duration(seconds=1, nanos=-5),  # no Duration at all: mixed signs...
    Duration(seconds=1, nanos=2_000_000_000),  # ...nanos past a second
])
def test_grace_outside_zero_to_seven_days_is_invalid(ts: RunningServer, admin, grace) -> None:
    old = create(ts, admin)
    error = rpc_error(ts.stub.RotateToken,
                      pb.RotateTokenRequest(id=old.api_token.id, grace_period=grace),
                      metadata=bearer(admin))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(error) == ["grace_period"]
    assert works(ts, old.token)


def test_only_an_active_token_can_be_rotated(ts: RunningServer, admin) -> None:
    revoked = create(ts, admin)
    ts.stub.RevokeToken(pb.RevokeTokenRequest(id=revoked.api_token.id), metadata=bearer(admin))
    expired = create(ts, admin)
    set_expiry(ts, expired.api_token.id, later(seconds=-5))
    for made, state in ((revoked, "revoked"), (expired, "expired")):
        error = rpc_error(rotate, ts, admin, made.api_token.id)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert state in error.details()
    # Outside the caller's reach is NOT_FOUND, as everywhere.
    other = ts.manager("other@evil.test", org="evil")
    assert rpc_error(rotate, ts, other, revoked.api_token.id).code() == grpc.StatusCode.NOT_FOUND


def test_concurrent_rotations_of_one_token_have_one_winner(ts: RunningServer, admin) -> None:
    old = create(ts, admin)
    outcomes: list[object] = []
    barrier = threading.Barrier(4)

    def attempt() -> None:
        barrier.wait()
        try:
            outcomes.append(rotate(ts, admin, old.api_token.id).api_token.id)
        except grpc.RpcError as error:
            outcomes.append(error.code())

    threads = [threading.Thread(target=attempt) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if isinstance(o, str)]
    assert len(winners) == 1, outcomes
    assert outcomes.count(grpc.StatusCode.FAILED_PRECONDITION) == 3
    assert get(ts, admin, old.api_token.id).replaced_by_id == winners[0]


def test_rest_rotation_and_409_conflict(ts: RunningServer, rest: Rest, admin) -> None:
    old = create(ts, admin)
    r = rest.client.post(f"/api/v1/api-tokens/{old.api_token.id}:rotate",
                         json={"gracePeriod": "3600s"}, headers=bearer_header(admin))
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"token", "apiToken", "previous"}
    assert body["apiToken"]["rotatedFromId"] == old.api_token.id
    assert body["previous"]["replacedById"] == body["apiToken"]["id"]
    assert body["previous"]["state"] == "ACTIVE" and body["previous"]["expiresAt"]
    assert works(ts, body["token"])
    again = rest.client.post(f"/api/v1/api-keys/{old.api_token.id}:rotate",
                             json={"gracePeriod": "0s"}, headers=bearer_header(admin))
    assert again.status_code == 409, again.text
    assert again.json()["error"]["code"] == "conflict"
    bad = rest.client.post(f"/api/v1/api-tokens/{body['apiToken']['id']}:rotate",
                           json={"gracePeriod": "-1s"}, headers=bearer_header(admin))
    assert bad.status_code == 422
    assert [d["field"] for d in bad.json()["error"]["details"]] == ["gracePeriod"]


# Update.


def update(ts: RunningServer, token: str, token_id: str, paths: list[str], **values):
    return ts.stub.UpdateToken(
        pb.UpdateTokenRequest(api_token=pb.ApiToken(id=token_id, **values),
                              update_mask=FieldMask(paths=paths)),
        metadata=bearer(token), timeout=10,
    )


def test_update_changes_only_the_masked_fields(ts: RunningServer, admin) -> None:
    made = create(ts, admin, name="old name", scopes=["pass:read", "invoice.view"],
                  expires_at=stamp(later(days=3)))
    # name is in the request too but not in the mask: it stays.
    updated = update(ts, admin, made.api_token.id, ["scopes"], name="ignored",
                     scopes=["pass:read"])
    assert updated.name == "old name" and list(updated.scopes) == ["pass:read"]
    assert updated.expires_at == made.api_token.expires_at
    # Scope changes apply on the next Authenticate.
    assert list(ts.authenticate(made.token).scopes) == ["pass:read"]
    limit = pb.RateLimit(requests=5, period=Duration(seconds=1))
    tomorrow = later(days=1)
    updated = update(ts, admin, made.api_token.id, ["name", "rate_limit", "expires_at"],
                     name="new name", rate_limit=limit, expires_at=stamp(tomorrow))
    assert (updated.name, updated.rate_limit) == ("new name", limit)
    assert updated.expires_at.ToDatetime(tzinfo=UTC) == tomorrow
    # A masked field left unset clears it: no expiry, the default rate limit.
    cleared = update(ts, admin, made.api_token.id, ["expires_at", "rate_limit"])
    assert not cleared.HasField("expires_at") and not cleared.HasField("rate_limit")


def test_update_applies_the_rules_of_create(ts: RunningServer, admin) -> None:
    made = create(ts, admin, scopes=["pass:read"])
    cases = [
        (["name"], {"name": "  "}, "api_token.name"),
        (["scopes"], {"scopes": []}, "api_token.scopes"),
        (["scopes"], {"scopes": ["nope"]}, "api_token.scopes"),
        (["expires_at"], {"expires_at": stamp(later(seconds=-60))}, "api_token.expires_at"),
        (["rate_limit"], {"rate_limit": pb.RateLimit(requests=0, period=Duration(seconds=1))},
         "api_token.rate_limit.requests"),
        (["rate_limit"], {"rate_limit": pb.RateLimit(requests=5)}, "api_token.rate_limit.period"),
        (["created_at"], {}, "update_mask"),
    ]
    for paths, values, field in cases:
        error = rpc_error(update, ts, admin, made.api_token.id, paths, **values)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (paths, values)
        assert fields(error) == [field], (paths, error.details())
    # A token cannot widen another beyond its own scopes.
    narrow = create(ts, admin, scopes=["api_token:manage", "pass:read"])
    error = rpc_error(update, ts, narrow.token, made.api_token.id, ["scopes"],
                      scopes=["invoice.view"])
    assert fields(error) == ["api_token.scopes"]


def test_removing_an_expiry_only_where_create_could(ts: RunningServer, admin) -> None:
    short = create(ts, admin, scopes=["api_token:manage", "pass:read"],
                   expires_at=stamp(later(hours=1)))
    child = create(ts, short.token, expires_at=stamp(later(minutes=30)))
    # The caller expires: it may not remove an expiry, nor set a later one.
    for paths, values in ((["expires_at"], {}),
                          (["expires_at"], {"expires_at": stamp(later(hours=2))})):
        error = rpc_error(update, ts, short.token, child.api_token.id, paths, **values)
        assert fields(error) == ["api_token.expires_at"]
    # Nor may anyone lift a child beyond its parent, even a caller that never expires.
    error = rpc_error(update, ts, admin, child.api_token.id, ["expires_at"])
    assert fields(error) == ["api_token.expires_at"]
    assert "parent" in error.details()
    # A root token's expiry can be removed by a caller that could create it without one.
    assert not update(ts, admin, short.api_token.id, ["expires_at"]).HasField("expires_at")


def test_shortening_a_parent_shortens_its_children(ts: RunningServer, admin) -> None:
    parent = create(ts, admin, scopes=["api_token:manage", "pass:read"],
                    expires_at=stamp(later(days=2)))
    child = create(ts, parent.token, scopes=["api_token:manage", "pass:read"],
                   expires_at=stamp(later(days=1)))
    grandchild = create(ts, child.token, expires_at=stamp(later(hours=20)))
    hour = later(hours=1)
    update(ts, admin, parent.api_token.id, ["expires_at"], expires_at=stamp(hour))
    for made in (child, grandchild):
        assert get(ts, admin, made.api_token.id).expires_at.ToDatetime(tzinfo=UTC) == hour


def test_a_revoked_or_rotated_token_cannot_be_changed(ts: RunningServer, admin) -> None:
    revoked = create(ts, admin)
    ts.stub.RevokeToken(pb.RevokeTokenRequest(id=revoked.api_token.id), metadata=bearer(admin))
    rotated = create(ts, admin)
    rotate(ts, admin, rotated.api_token.id)
    for made in (revoked, rotated):
        error = rpc_error(update, ts, admin, made.api_token.id, ["name"], name="x")
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_rest_patch_body_keys_are_the_mask(ts: RunningServer, rest: Rest, admin) -> None:
    made = create(ts, admin, name="before", scopes=["pass:read", "invoice.view"],
                  expires_at=stamp(later(days=3)))
    url = f"/api/v1/api-tokens/{made.api_token.id}"
    h = bearer_header(admin)
    r = rest.client.patch(url, json={"name": "after"}, headers=h)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["name"] == "after" and body["scopes"] == ["pass:read", "invoice.view"]
    assert body["expiresAt"] is not None
    r = rest.client.patch(url.replace("api-tokens", "api-keys"),
                          json={"expiresAt": None, "rateLimit": {"requests": 10, "period": "60s"}},
                          headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["expiresAt"] is None and r.json()["name"] == "after"
    assert r.json()["rateLimit"] == {"requests": 10, "period": "60s"}
    # Errors name the field as the caller sent it, at the top level of the body.
    r = rest.client.patch(url, json={"expiresAt": "2001-01-01T00:00:00Z"}, headers=h)
    assert r.status_code == 422
    assert [d["field"] for d in r.json()["error"]["details"]] == ["expiresAt"]
    r = rest.client.patch(url, json={"state": "ACTIVE"}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "updateMask"
    r = rest.client.patch(url, json={"nmae": "typo"}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["details"][0]["field"] == "apiToken.nmae"
    # An explicit mask in the query wins over the body's keys.
    r = rest.client.patch(url, params={"updateMask": "name"},
                          json={"name": "masked", "scopes": ["pass:read"]}, headers=h)
    assert r.status_code == 200 and r.json()["scopes"] == ["pass:read", "invoice.view"]
    ts.stub.RevokeToken(pb.RevokeTokenRequest(id=made.api_token.id), metadata=bearer(admin))
    r = rest.client.patch(url, json={"name": "late"}, headers=h)
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"


# State and the list filters.


def list_all(ts: RunningServer, token: str, page_size: int = 2, **filters) -> list[pb.ApiToken]:
    out, page_token = [], ""
    while True:
        page = ts.stub.ListTokens(
            pb.ListTokensRequest(page_size=page_size, page_token=page_token, **filters),
            metadata=bearer(token), timeout=10,
        )
        out.extend(page.tokens)
        if not page.next_page_token:
            return out
        page_token = page.next_page_token


BEFORE_USE: list[Timestamp] = []


@pytest.fixture
def zoo(ts: RunningServer, admin) -> dict[str, pb.CreateTokenResponse]:
    """Tokens in every state, some used: named by what they are."""
    made = {name: create(ts, admin, name=name) for name in (
        "active-used", "active-unused", "expired", "revoked", "active-used-2", "never")}
    set_expiry(ts, made["expired"].api_token.id, later(seconds=-1))
    ts.stub.RevokeToken(pb.RevokeTokenRequest(id=made["revoked"].api_token.id),
                        metadata=bearer(admin))
    BEFORE_USE.append(stamp(datetime.now(UTC)))
    for name in ("active-used", "active-used-2"):
        ts.authenticate(made[name].token)
    ts.server.usage.flush()
    return made


def test_state_is_computed_when_read(ts: RunningServer, admin, zoo) -> None:
    states = {t.name: t.state for t in list_all(ts, admin)}
    assert states["expired"] == pb.ApiToken.EXPIRED
    assert states["revoked"] == pb.ApiToken.REVOKED
    assert states["active-unused"] == states["active-used"] == pb.ApiToken.ACTIVE


def test_list_filters_compose_with_paging(ts: RunningServer, admin, zoo) -> None:
    def names(**filters) -> list[str]:
        return [t.name for t in list_all(ts, admin, **filters) if t.name in zoo]

    assert names(state=pb.ApiToken.EXPIRED) == ["expired"]
    assert names(state=pb.ApiToken.REVOKED) == ["revoked"]
    assert names(state=pb.ApiToken.ACTIVE) == [
        "never", "active-used-2", "active-unused", "active-used"]
    before_use = BEFORE_USE[-1]
    assert names(not_used_since=before_use) == ["never", "revoked", "expired", "active-unused"]
    assert names(state=pb.ApiToken.ACTIVE, not_used_since=before_use) == [
        "never", "active-unused"]
    # A token used before the given time counts as unused since then.
    after_use = stamp(datetime.now(UTC) + timedelta(seconds=1))
    assert len(names(not_used_since=after_use)) == len(zoo)


def test_a_page_token_is_bound_to_its_filters(ts: RunningServer, admin, zoo) -> None:
    first = ts.stub.ListTokens(pb.ListTokensRequest(page_size=1, state=pb.ApiToken.ACTIVE),
                               metadata=bearer(admin))
    assert first.next_page_token
    for other in ({}, {"state": pb.ApiToken.REVOKED},
                  {"state": pb.ApiToken.ACTIVE, "not_used_since": stamp(later())}):
        error = rpc_error(ts.stub.ListTokens, pb.ListTokensRequest(
            page_size=1, page_token=first.next_page_token, **other), metadata=bearer(admin))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fields(error) == ["page_token"]
    # An unfiltered page token does not carry over to a filtered list either.
    plain = ts.stub.ListTokens(pb.ListTokensRequest(page_size=1), metadata=bearer(admin))
    error = rpc_error(ts.stub.ListTokens, pb.ListTokensRequest(
        page_size=1, page_token=plain.next_page_token, state=pb.ApiToken.ACTIVE),
        metadata=bearer(admin))
    assert fields(error) == ["page_token"]


def test_rest_list_filters(ts: RunningServer, rest: Rest, admin, zoo) -> None:
    h = bearer_header(admin)
    r = rest.client.get("/api/v1/api-tokens", params={"state": "REVOKED"}, headers=h)
    assert r.status_code == 200, r.text
    assert [t["name"] for t in r.json()["tokens"]] == ["revoked"]
    assert r.json()["tokens"][0]["state"] == "REVOKED"
    since = BEFORE_USE[-1].ToJsonString()
    r = rest.client.get("/api/v1/api-keys", params={
        "state": "ACTIVE", "notUsedSince": since, "pageSize": 1}, headers=h)
    assert [t["name"] for t in r.json()["tokens"]] == ["never"]
    r2 = rest.client.get("/api/v1/api-keys", params={
        "state": "ACTIVE", "notUsedSince": since, "pageToken": r.json()["nextPageToken"]},
        headers=h)
    assert [t["name"] for t in r2.json()["tokens"]][:1] == ["active-unused"]
    r3 = rest.client.get("/api/v1/api-keys", params={
        "state": "ACTIVE", "pageToken": r.json()["nextPageToken"]}, headers=h)
    assert r3.status_code == 422 and r3.json()["error"]["details"][0]["field"] == "pageToken"
    bad = rest.client.get("/api/v1/api-tokens", params={"state": "GONE"}, headers=h)
    assert bad.status_code == 422


def test_a_token_cannot_rotate_a_token_stronger_or_longer_lived_than_itself(
    ts: RunningServer, admin
) -> None:
    """Rotation hands the caller the new secret: it would otherwise turn a weak or
    short-lived token into a copy of any stronger token of the same user."""
    weak = create(ts, admin, "weak", ("api_token:manage", "pass:read"),
                  expires_at=stamp(later(hours=1)))
    strong = create(ts, admin, "strong", ("api_token:manage", "pass:read", "pass:create"))
    error = rpc_error(rotate, ts, weak.token, strong.api_token.id)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "pass:create" in error.details()
    # The same scopes, but the target never expires and the caller does within the hour.
    lasting = create(ts, admin, "lasting", ("api_token:manage", "pass:read"))
    error = rpc_error(rotate, ts, weak.token, lasting.api_token.id)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "outlive" in error.details()
    for untouched in (strong, lasting):
        info = get(ts, admin, untouched.api_token.id)
        assert info.state == pb.ApiToken.ACTIVE and not info.replaced_by_id
        assert works(ts, untouched.token)
    # Nothing stronger and no longer-lived: allowed, as rotating itself is.
    sooner = create(ts, weak.token, "sooner", ("pass:read",), expires_at=stamp(later(minutes=30)))
    assert works(ts, rotate(ts, weak.token, sooner.api_token.id).token)
    assert works(ts, rotate(ts, weak.token, weak.api_token.id).token)


def test_a_token_rotates_itself_after_its_user_lost_a_permission(ts: RunningServer) -> None:
    """Its replacement holds what it held, still narrowed by the user's permissions at
    every Authenticate: nothing stronger than itself, so nothing to refuse."""
    token = ts.manager("narrowed@acme.test", permissions=ALL)
    made = create(ts, token, "svc", ("api_token:manage", "pass:read", "pass:create"))
    with connection(ts.server.store.db):
        ts.server.service.set_permissions("narrowed@acme.test", ["api_token:manage", "pass:read"])
    rotated = rotate(ts, made.token, made.api_token.id)
    assert sorted(ts.authenticate(rotated.token).scopes) == ["api_token:manage", "pass:read"]


def test_an_admin_revokes_but_cannot_rotate_another_users_token(ts: RunningServer) -> None:
    """api_token:admin reaches the org's tokens to list and revoke them; a rotation
    would hand the admin a working secret of someone else's."""
    admin = ts.manager("boss@acme.test", permissions=("api_token:manage", "api_token:admin"))
    dave = ts.manager("dave@acme.test", permissions=("api_token:manage", "invoice.view"))
    theirs = create(ts, dave, "dave-prod", ("invoice.view",))
    error = rpc_error(rotate, ts, admin, theirs.api_token.id)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "owner" in error.details()
    assert get(ts, admin, theirs.api_token.id).state == pb.ApiToken.ACTIVE
    assert works(ts, theirs.token)
    ts.stub.RevokeToken(pb.RevokeTokenRequest(id=theirs.api_token.id), metadata=bearer(admin))
    assert not works(ts, theirs.token)


def test_a_state_filter_the_proto_does_not_define_is_invalid(ts: RunningServer, admin) -> None:
    for number in (7, -1):
        error = rpc_error(ts.stub.ListTokens, pb.ListTokensRequest(state=number),
                          metadata=bearer(admin), timeout=10)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fields(error) == ["state"]


def test_two_authorization_entries_are_no_caller(ts: RunningServer, admin) -> None:
    """Which of two credentials would count is not the caller's to leave open."""
    other = ts.manager("second@acme.test")
    error = rpc_error(ts.stub.ListTokens, pb.ListTokensRequest(),
                      metadata=(*bearer(admin), *bearer(other)), timeout=10)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
