"""The Python client's lifecycle calls against a real server, sync and asyncio alike."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from tokenservice_client import (
    AsyncTokenServiceClient,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    TokenServiceClient,
    Unauthenticated,
)
from tokenservice_client._base import UNSET

ADMIN = ["api_token:manage", "api_token:admin", "pass:read", "invoice.view"]


@pytest.fixture
def database_url(sqlite_database_url: str) -> str:
    """The client behaves the same whatever the store; the server's tests cover PostgreSQL."""
    return sqlite_database_url


@pytest.fixture
def admin_token(mint) -> str:
    return mint(ADMIN)


@pytest.fixture
def client(ts_target: str, admin_token: str) -> Iterator[TokenServiceClient]:
    with TokenServiceClient(ts_target, token=admin_token) as c:
        yield c


def test_rotate_update_filter_audit_and_report(client: TokenServiceClient, ts_target) -> None:
    made = client.create_token("ci", ["pass:read", "invoice.view"],
                               expires_at=datetime.now(UTC) + timedelta(days=7),
                               rate_limit=(100, timedelta(minutes=1)))
    assert made.api_token.rate_limit.requests == 100
    assert made.api_token.rate_limit.period.seconds == 60

    rotated = client.rotate_token(made.api_token.id, grace_period=timedelta(hours=1))
    assert rotated.api_token.rotated_from_id == made.api_token.id
    assert rotated.previous.replaced_by_id == rotated.api_token.id
    with pytest.raises(FailedPrecondition):
        client.rotate_token(made.api_token.id)

    new_id = rotated.api_token.id
    renamed = client.update_token(new_id, name="ci-2")
    assert renamed.name == "ci-2" and list(renamed.scopes) == ["pass:read", "invoice.view"]
    cleared = client.update_token(new_id, expires_at=None, rate_limit=None,
                                  scopes=["pass:read"])
    assert not cleared.HasField("expires_at") and not cleared.HasField("rate_limit")
    assert list(cleared.scopes) == ["pass:read"]
    with pytest.raises(InvalidArgument) as caught:
        client.update_token(new_id, rate_limit=(0, 60))
    assert caught.value.fields == ["api_token.rate_limit.requests"]
    with pytest.raises(TypeError):
        client.update_token(new_id)

    active = [t.id for t in client.iter_tokens(page_size=1, state="ACTIVE")]
    assert new_id in active and made.api_token.id in active  # the old one is in its grace
    revoked = client.revoke_token(made.api_token.id, revoke_children=True)
    assert [t.id for t in client.iter_tokens(state="REVOKED")] == [revoked.id]
    unused = {t.id for t in client.iter_tokens(not_used_since=datetime.now(UTC))}
    assert new_id in unused

    actions = [e.action for e in client.iter_audit_events(page_size=2, token_id=new_id)]
    assert actions == ["token.update", "token.update", "token.create"]
    assert [e.token_id for e in client.iter_audit_events(action="token.rotate")] == [
        made.api_token.id]

    with TokenServiceClient(ts_target) as anonymous:
        result = anonymous.report_leaked_tokens([rotated.token], "https://paste.test/1")
    assert [(r.token_prefix, r.revoked) for r in result.results] == [(rotated.token[:12], True)]
    with pytest.raises(Unauthenticated):
        client.authenticate(rotated.token)


def test_the_audit_log_needs_the_admin_scope(ts_target, mint) -> None:
    with TokenServiceClient(ts_target, token=mint(["api_token:manage", "pass:read"])) as c:
        with pytest.raises(PermissionDenied):
            c.list_audit_events()


def test_the_asyncio_client_does_the_same(ts_target, admin_token) -> None:
    async def scenario() -> None:
        async with AsyncTokenServiceClient(ts_target, token=admin_token) as client:
            made = await client.create_token("async", ["pass:read"],
                                             rate_limit=(5, 1.5))
            assert made.api_token.rate_limit.period.nanos == 500_000_000
            rotated = await client.rotate_token(made.api_token.id, 0)
            assert rotated.previous.state == rotated.previous.REVOKED
            with pytest.raises(FailedPrecondition):
                await client.rotate_token(made.api_token.id, 60)
            updated = await client.update_token(rotated.api_token.id, name="renamed",
                                                scopes=UNSET)
            assert updated.name == "renamed"
            revoked = [t.id async for t in client.iter_tokens(page_size=1, state="REVOKED")]
            assert revoked == [made.api_token.id]
            await client.revoke_token(rotated.api_token.id, revoke_children=True)
            events = [e.action async for e in client.iter_audit_events(
                page_size=1, token_id=rotated.api_token.id)]
            assert events == ["token.revoke", "token.update", "token.create"]
            report = await client.report_leaked_tokens([made.token], "scanner")
            assert report.results[0].revoked

    asyncio.run(scenario())
