"""Every rule of the service, on a throwaway SQLite file and no server: milliseconds a test."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tokenservice_server import tokens
from tokenservice_server.config import Config, RateLimit
from tokenservice_server.crypto import BcryptHasher
from tokenservice_server.errors import (
    TOKEN_RATE_LIMITED,
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
)
from tokenservice_server.fairshare import NOBODY, Claimant
from tokenservice_server.migrations import open_migrated
from tokenservice_server.models import ApiToken
from tokenservice_server.ratelimit import LocalStore
from tokenservice_server.scopes import ScopeCatalog
from tokenservice_server.service import MAX_PAGE_SIZE, TokenService, wants_cache_budget
from tokenservice_server.store import Store
from tokenservice_server.values import CachedUse, Principal, RateLimitStatus, from_micros

START = 1_800_000_000_000_000  # micros: 2027-01-15


class CountingHasher(BcryptHasher):
    """Real bcrypt (4 rounds) that counts its checks, to prove the cache skips them."""

    def __init__(self) -> None:
        super().__init__(rounds=4, slots=2, max_waiting=8)
        self.checks = 0

    def verify(self, secret: str, hashed: str, claimant: Claimant = NOBODY) -> bool:
        self.checks += 1
        return super().verify(secret, hashed, claimant)

    async def averify(self, secret: str, hashed: str, claimant: Claimant = NOBODY) -> bool:
        self.checks += 1
        return await super().averify(secret, hashed, claimant)


class World:
    def __init__(self, service: TokenService, hasher: CountingHasher, now: list[int]) -> None:
        self.service = service
        self.hasher = hasher
        self.now = now

    def user(self, email: str, org: str, permissions: list[str]) -> None:
        self.service.add_user(email, org, permissions)

    def token(self, email: str, scopes: list[str], **kw: object) -> str:
        return self.service.mint_for_email(email, "t", scopes, kw.get("expires_at")).raw  # type: ignore[arg-type]

    def caller(self, raw: str) -> Principal:
        """A management call's caller: not counted against the token's rate limit."""
        return self.service.authenticate(raw, "198.51.100.7", limited=False)

    def advance(self, seconds: float) -> None:
        self.now[0] += int(seconds * 1_000_000)


@pytest.fixture
def config() -> Config:
    return Config(bcrypt_rounds=4)


@pytest.fixture
def world(tmp_path: Path, config: Config) -> Iterator[World]:
    store = Store(open_migrated(f"sqlite:///{tmp_path}/rules.db"))
    now = [START]
    hasher = CountingHasher()
    # Limits and throttles on the same clock as the rules (seconds, not micros).
    limits = LocalStore(clock=lambda: now[0] / 1_000_000)
    service = TokenService(
        config, store, ScopeCatalog.default(), hasher, clock=lambda: now[0], limits=limits
    )
    with store.connection():
        w = World(service, hasher, now)
        w.user("ann@acme.test", "acme", ["api_token:manage", "pass:read", "pass:create"])
        w.user("bob@acme.test", "acme", ["api_token:manage", "api_token:admin", "pass:read"])
        w.user("eve@evil.test", "evil", ["api_token:manage", "api_token:admin", "pass:read"])
        yield w
    store.close()
    hasher.close()


def at(micros: int) -> datetime:
    return from_micros(micros)


# Create.


def test_create_returns_the_raw_token_once_and_stores_only_metadata(world: World) -> None:
    ann = world.caller(world.token("ann@acme.test", ["api_token:manage", "pass:read"]))
    created = world.service.create_token(ann, "  POS  ", ["pass:read"], None)
    assert created.raw.startswith("tks_") and created.info.name == "POS"
    assert created.info.token_prefix == created.raw[:12]
    assert created.info.scopes == ("pass:read",) and created.info.created_by_email == ann.email
    assert world.caller(created.raw).scopes == ("pass:read",)


@pytest.mark.parametrize(
    ("name", "scopes", "expires", "fields"),
    [
        ("", ["pass:read"], None, {"name"}),
        ("x" * 201, ["pass:read"], None, {"name"}),
        ("a\x00b", ["pass:read"], None, {"name"}),
        ("a\u202eb", ["pass:read"], None, {"name"}),
        ("ok", [], None, {"scopes"}),
        ("ok", ["no:such"], None, {"scopes"}),
        ("ok", ["pass:read", "pass:read"], None, {"scopes"}),
        ("ok", ["pass:read"], at(START - 1), {"expires_at"}),
        ("", [], at(START), {"name", "scopes", "expires_at"}),
    ],
)
def test_create_names_every_offending_field(
    world: World, name: str, scopes: list[str], expires: datetime | None, fields: set[str]
) -> None:
    ann = world.caller(world.token("ann@acme.test", ["api_token:manage", "pass:read"]))
    with pytest.raises(InvalidArgument) as refused:
        world.service.create_token(ann, name, scopes, expires)
    assert {f for f, _ in refused.value.violations} == fields


def test_a_token_never_mints_a_stronger_one(world: World) -> None:
    # ann holds pass:create as a permission, but this token of hers does not carry it.
    ann = world.caller(world.token("ann@acme.test", ["api_token:manage", "pass:read"]))
    with pytest.raises(InvalidArgument, match="not held"):
        world.service.create_token(ann, "x", ["pass:create"], None)


def test_create_needs_the_manage_scope(world: World) -> None:
    reader = world.caller(world.token("ann@acme.test", ["pass:read"]))
    with pytest.raises(PermissionDenied):
        world.service.create_token(reader, "x", ["pass:read"], None)


def test_users_are_unique_by_email(world: World) -> None:
    with pytest.raises(AlreadyExists):
        world.service.add_user("ANN@acme.test", "other", ["pass:read"])


# Reach.


def test_reach_is_own_tokens_or_the_org_with_admin_and_never_another_org(world: World) -> None:
    ann_raw = world.token("ann@acme.test", ["api_token:manage", "pass:read"])
    ann = world.caller(ann_raw)
    bob = world.caller(world.token("bob@acme.test", ["api_token:manage", "api_token:admin"]))
    eve = world.caller(world.token("eve@evil.test", ["api_token:manage", "api_token:admin"]))
    bob_plain = world.caller(world.token("bob@acme.test", ["api_token:manage"]))
    assert world.service.get_token(ann, ann.token_id).id == ann.token_id
    assert world.service.get_token(bob, ann.token_id).id == ann.token_id  # admin, same org
    for outsider in (eve, bob_plain):
        with pytest.raises(NotFound):
            world.service.get_token(outsider, ann.token_id)
        with pytest.raises(NotFound):
            world.service.revoke_token(outsider, ann.token_id)
    with pytest.raises(NotFound):
        world.service.get_token(ann, "not-a-uuid")
    assert world.caller(ann_raw).token_id == ann.token_id  # the failed revokes did nothing


# Revoke.


def test_revoke_is_immediate_and_idempotent(world: World) -> None:
    raw = world.token("ann@acme.test", ["api_token:manage", "pass:read"])
    ann = world.caller(raw)
    first = world.service.revoke_token(ann, ann.token_id)
    assert first.revoked_at == at(START)
    with pytest.raises(Unauthenticated):
        world.caller(raw)
    world.advance(60)
    assert world.service.revoke_token(ann, ann.token_id).revoked_at == first.revoked_at


# Authenticate.


def test_authenticate_returns_scopes_intersected_with_current_permissions(world: World) -> None:
    raw = world.token("ann@acme.test", ["pass:read", "pass:create"])
    assert world.caller(raw).scopes == ("pass:read", "pass:create")
    world.service.store.add_user("carl@acme.test", "acme", ["pass:read"], START)
    carl_raw = world.service.mint_for_email("carl@acme.test", "c", ["pass:read"], None).raw
    carl = world.caller(carl_raw)
    assert carl.scopes == ("pass:read",) and carl.org_id == "acme"


def test_every_failure_is_the_same_unauthenticated(world: World) -> None:
    good = world.token("ann@acme.test", ["pass:read"], expires_at=at(START + 10_000_000))
    lookalike = good[:-6] + ("A" if good[-6] != "A" else "B") + good[-5:]  # checksum broken
    forged, _ = tokens.new_token("tks_")  # well formed, unknown lookup id
    wrong_secret = good[:16] + forged[16:]  # known lookup id, wrong secret
    messages = set()
    for raw in ("", "garbage", lookalike, forged, tokens.new_token("tks_")[0]):
        with pytest.raises(Unauthenticated) as e:
            world.caller(raw)
        messages.add(e.value.message)
    checks = world.hasher.checks
    for raw in (lookalike, forged):
        with pytest.raises(Unauthenticated):
            world.caller(raw)
    assert world.hasher.checks == checks, "no hash check for a token that cannot exist"
    if tokens.parse(wrong_secret, "tks_") is not None:
        with pytest.raises(Unauthenticated) as e:
            world.caller(wrong_secret)
        messages.add(e.value.message)
    world.advance(10)
    with pytest.raises(Unauthenticated) as e:
        world.caller(good)  # expired now
    messages.add(e.value.message)
    assert len(messages) == 1


def test_a_disabled_user_stops_every_token_at_once(world: World) -> None:
    raw = world.token("ann@acme.test", ["pass:read"])
    world.caller(raw)
    world.service.disable_user("ann@acme.test")
    with pytest.raises(Unauthenticated):
        world.caller(raw)
    with pytest.raises(NotFound):
        world.service.disable_user("nobody@acme.test")


def test_one_hash_check_then_the_cache_and_revocation_still_read_every_time(world: World) -> None:
    raw = world.token("ann@acme.test", ["api_token:manage"])
    before = world.hasher.checks
    ann = world.caller(raw)
    world.caller(raw)
    asyncio.run(world.service.aauthenticate(raw))
    assert world.hasher.checks == before + 1
    world.service.revoke_token(ann, ann.token_id)
    with pytest.raises(Unauthenticated):
        asyncio.run(world.service.aauthenticate(raw))


def test_the_async_path_gives_the_same_answers(world: World) -> None:
    raw = world.token("ann@acme.test", ["pass:read"])
    sync = world.service.authenticate(raw)
    assert sync.rate_limit is not None and sync.rate_limit.remaining == 599
    answer = asyncio.run(world.service.aauthenticate(raw))
    assert answer.rate_limit is not None and answer.rate_limit.remaining == 598
    assert replace(answer, rate_limit=None) == replace(sync, rate_limit=None)
    with pytest.raises(Unauthenticated):
        asyncio.run(world.service.aauthenticate(raw[:-1] + ("x" if raw[-1] != "x" else "y")))


# Paging.


def test_list_is_newest_first_keyset_paginated_and_the_caller_s_own(world: World) -> None:
    ann_raw = world.token("ann@acme.test", ["api_token:manage"])
    ann = world.caller(ann_raw)
    made = []
    for _ in range(5):
        world.advance(1)
        made.append(world.service.create_token(ann, "t", ["api_token:manage"], None).info.id)
    world.token("bob@acme.test", ["pass:read"])  # someone else's, not listed for ann
    seen: list[str] = []
    page_token = ""
    pages = 0
    while True:
        page = world.service.list_tokens(ann, 2, page_token)
        seen += [t.id for t in page.tokens]
        pages += 1
        page_token = page.next_page_token
        if not page_token:
            break
    assert seen == [*reversed(made), ann.token_id] and pages == 3
    bob = world.caller(world.token("bob@acme.test", ["api_token:manage", "api_token:admin"]))
    assert len(world.service.list_tokens(bob, 0, "").tokens) == 8  # the whole org


def test_page_size_rules_and_bad_page_tokens(world: World) -> None:
    ann = world.caller(world.token("ann@acme.test", ["api_token:manage"]))
    with pytest.raises(InvalidArgument) as e:
        world.service.list_tokens(ann, -1, "")
    assert e.value.violations[0][0] == "page_size"
    assert world.service.list_tokens(ann, MAX_PAGE_SIZE * 10, "").next_page_token == ""
    for bad in ("x", "Zm9v", "MTphOmI"):
        with pytest.raises(InvalidArgument):
            world.service.list_tokens(ann, 1, bad)


def test_expiry_is_reported_and_enforced_at_the_microsecond(world: World) -> None:
    expires = at(START) + timedelta(seconds=5)
    raw = world.token("ann@acme.test", ["pass:read"], expires_at=expires)
    assert world.caller(raw).expires_at == expires
    world.advance(5)
    with pytest.raises(Unauthenticated):
        world.caller(raw)
    assert expires.tzinfo is UTC


# Rate limits.


def _own_limit(raw: str, requests: int, period_us: int) -> None:
    """Gives the token a limit of its own, as CreateToken and UpdateToken store it."""
    lookup_id = tokens.parse(raw, "tks_").lookup_id  # type: ignore[union-attr]
    ApiToken.update(rate_limit_requests=requests, rate_limit_period_us=period_us).where(
        ApiToken.lookup_id == lookup_id
    ).execute()


@pytest.mark.parametrize("config", [Config(bcrypt_rounds=4, rate_limit=RateLimit(100, 10.0))])
def test_every_authenticate_counts_and_over_the_limit_is_told_when_to_retry(
    world: World,
) -> None:
    raw = world.token("ann@acme.test", ["pass:read"])
    first = world.service.authenticate(raw, "198.51.100.7").rate_limit
    # 100 per 10 s, counted in slices of a second: a call counts until its slice has
    # left the window, 10 s and the slice after it.
    assert first == RateLimitStatus(limit=100, remaining=99, reset_at_us=START + 11_000_000)
    world.advance(2.5)
    rest = [world.service.authenticate(raw, "198.51.100.7").rate_limit for _ in range(99)]
    assert [r.remaining for r in rest] == list(range(98, -1, -1))  # type: ignore[union-attr]
    assert rest[-1].reset_at_us == START + 13_000_000  # type: ignore[union-attr]
    for _ in range(20):
        with pytest.raises(RateLimited) as refused:
            world.service.authenticate(raw, "198.51.100.7")
        error = refused.value
        assert error.reason == TOKEN_RATE_LIMITED and not error.client_throttled
        assert error.retry_after == pytest.approx(8.5)  # when the first call leaves
    # A refused call is no failed authentication: neither the client nor the
    # token is any closer to being throttled.
    assert world.service.client_failures.untouched("198.51.100.7")
    assert world.service.lookup_failures.untouched(tokens.parse(raw, "tks_").lookup_id)  # type: ignore[union-attr]
    # Nor does it push the retry time back.
    world.advance(8.5)
    assert world.service.authenticate(raw).rate_limit.remaining == 0  # type: ignore[union-attr]
    # Once every call has left the window, the whole limit is back.
    world.advance(11.0)
    assert world.service.authenticate(raw).rate_limit.remaining == 99  # type: ignore[union-attr]


def _cached(service: TokenService, raw: str) -> Principal:
    """An Authenticate from a lease cache: it asks for a cache budget."""
    token = wants_cache_budget.set(True)
    try:
        return service.authenticate(raw)
    finally:
        wants_cache_budget.reset(token)


@pytest.mark.parametrize("config", [Config(bcrypt_rounds=4, rate_limit=RateLimit(100, 10.0))])
def test_uses_a_consumer_answered_from_its_cache_count_against_the_limit(world: World) -> None:
    default = world.token("ann@acme.test", ["pass:read"])
    own = world.token("ann@acme.test", ["pass:read"])
    _own_limit(own, 4, 60_000_000)  # 4 a minute: a slice of one use
    slices = {raw: _cached(world.service, raw).rate_limit.cache_budget  # type: ignore[union-attr]
              for raw in (default, own)}
    assert slices == {default: 10, own: 1}
    # An Authenticate that does not ask is promised nothing.
    assert world.service.authenticate(default).rate_limit.cache_budget == 0  # type: ignore[union-attr]
    ids = {raw: world.caller(raw).token_id for raw in (default, own)}
    # The consumers report their uses (ids made up, uses of nothing and a bad id
    # change nothing): counted up to what was promised, and no further.
    uses = [CachedUse(ids[default], 500, START), CachedUse(ids[own], 3, START),
            CachedUse(str(uuid.uuid4()), 5, START), CachedUse("not-an-id", 5, START),
            CachedUse(ids[default], 0, START)]
    asyncio.run(world.service.arecord_cached_uses(uses))
    # default: 2 calls and the 10 promised; own: 1 call and the 1 promised.
    assert world.service.authenticate(default).rate_limit.remaining == 87  # type: ignore[union-attr]
    assert world.service.authenticate(own).rate_limit.remaining == 1  # type: ignore[union-attr]
    # Reported again, with nothing promised: a watcher cannot drain a token's limit.
    asyncio.run(world.service.arecord_cached_uses(uses))
    assert world.service.authenticate(own).rate_limit.remaining == 0  # type: ignore[union-attr]
    with pytest.raises(RateLimited):
        world.service.authenticate(own)
    # Until the calls leave the window, a period (and a slice) on.
    world.advance(66.0)
    assert world.service.authenticate(own).rate_limit is not None


def test_a_token_s_own_limit_wins_over_the_default(world: World) -> None:
    mine = world.token("ann@acme.test", ["pass:read"])
    other = world.token("ann@acme.test", ["pass:read"])
    _own_limit(mine, 2, 60_000_000)
    assert world.service.authenticate(mine).rate_limit.limit == 2  # type: ignore[union-attr]
    assert world.service.authenticate(mine).rate_limit.remaining == 0  # type: ignore[union-attr]
    with pytest.raises(RateLimited):
        world.service.authenticate(mine)  # 2 per minute
    world.advance(30)
    # Counted per token: the other one, on the service default, is untouched.
    assert world.service.authenticate(other).rate_limit == RateLimitStatus(
        600, 599, START + 30_000_000 + 66_000_000
    )


@pytest.mark.parametrize("config", [Config(bcrypt_rounds=4, rate_limit=None)])
def test_with_the_default_off_only_tokens_with_their_own_limit_are_limited(
    world: World,
) -> None:
    free = world.token("ann@acme.test", ["pass:read"])
    limited = world.token("ann@acme.test", ["pass:read"])
    _own_limit(limited, 1, 1_000_000)
    for _ in range(1000):
        assert world.service.authenticate(free).rate_limit is None
    assert world.service.authenticate(limited).rate_limit.limit == 1  # type: ignore[union-attr]
    with pytest.raises(RateLimited):
        asyncio.run(world.service.aauthenticate(limited))


def test_a_management_call_s_caller_is_not_counted(world: World) -> None:
    raw = world.token("ann@acme.test", ["api_token:manage"])
    for _ in range(700):  # more than the default 600 per minute
        world.service.list_tokens(world.caller(raw), 10, "")
    assert world.service.authenticate(raw).rate_limit.remaining == 599  # type: ignore[union-attr]


def test_a_limit_check_fails_no_authentication_that_would_have_failed(world: World) -> None:
    """Over the limit or not, a revoked token is refused as UNAUTHENTICATED, never 429."""
    raw = world.token("ann@acme.test", ["api_token:manage"])
    _own_limit(raw, 1, 60_000_000)
    ann = world.caller(raw)
    world.service.authenticate(raw)
    world.service.revoke_token(ann, ann.token_id)
    with pytest.raises(Unauthenticated):
        world.service.authenticate(raw)


# Scope names: compared exactly, never normalised.

KELVIN = "\u212a"  # looks like K, and str.lower() turns it into k


@pytest.mark.parametrize(
    ("spelling", "why"),
    [
        ("PASS:READ", "not a known scope"),
        ("Pass:read", "not a known scope"),
        ("\tpass:read\n", "white space or control"),
        (" pass:read", "white space or control"),
        ("pass:read\u200b", "white space or control"),  # zero-width space: a format character
        ("pass:re\u0430d", "not a known scope"),  # Cyrillic a: canonical, but no catalog name
        ("api_to" + KELVIN + "en:manage", "canonical Unicode"),
        ("\uff50ass:read", "canonical Unicode"),  # full-width p
    ],
)
def test_a_scope_matches_only_as_the_catalog_spells_it(
    world: World, spelling: str, why: str
) -> None:
    ann = world.caller(world.token("ann@acme.test", ["api_token:manage", "pass:read"]))
    with pytest.raises(InvalidArgument) as refused:
        world.service.create_token(ann, "x", [spelling], None)
    assert [f for f, _ in refused.value.violations] == ["scopes"]
    assert why in refused.value.violations[0][1]
    with pytest.raises(InvalidArgument) as refused:
        world.service.add_user("new@acme.test", "acme", [spelling])
    assert why in refused.value.violations[0][1]
    assert world.service.create_token(ann, "x", ["pass:read"], None).info.scopes == ("pass:read",)


def test_no_change_to_a_page_token_gets_past_the_checks_or_fails_otherwise(world: World) -> None:
    """Every one-character change of a real page token is refused as INVALID_ARGUMENT
    or reads as a cursor within range, and listing never fails in another way."""
    ann = world.caller(world.token("ann@acme.test", ["api_token:manage"]))
    for _ in range(3):
        world.advance(1)
        world.service.create_token(ann, "t", ["api_token:manage"], None)
    token = world.service.list_tokens(ann, 1, "").next_page_token
    outcomes = {"refused": 0, "listed": 0}
    for i in range(len(token)):
        for replacement in "A_-9z=+/ ":
            changed = token[:i] + replacement + token[i + 1:]
            if changed == token:
                continue
            try:
                world.service.list_tokens(ann, 1, changed)
                outcomes["listed"] += 1
            except InvalidArgument as e:
                assert e.violations[0][0] == "page_token"
                outcomes["refused"] += 1
    assert outcomes["refused"] > 0


# Throttling: guessing at a token costs the guesser, never the token's owner.


def _service(world: World, **settings: object) -> TokenService:
    """Another TokenService over the world's store, with other throttle settings."""
    config = Config(bcrypt_rounds=4, **settings)  # type: ignore[arg-type]
    return TokenService(config, world.service.store, ScopeCatalog.default(), world.hasher,
                        clock=lambda: world.now[0])


def _wrong_secret(raw: str) -> str:
    body = raw[:16] + tokens.new_token("tks_")[1].secret  # tks_ + lookup id, another secret
    return body + tokens.checksum(body)


def test_guessing_at_a_lookup_id_never_locks_its_owner_out(world: World) -> None:
    service = _service(world, auth_failure_burst=20, auth_failure_refill_per_second=0.001,
                       lookup_failure_burst=3, lookup_failure_refill_per_second=0.001)
    victim = world.token("ann@acme.test", ["pass:read"])  # its secret never checked here
    attacker, owner = "198.51.100.66", "203.0.113.7"
    outcomes = []
    for _ in range(30):
        try:
            service.authenticate(_wrong_secret(victim), attacker)
        except Unauthenticated:
            outcomes.append("checked")
        except RateLimited as refused:
            assert refused.client_throttled  # held back by the tarpit like any throttled call
            outcomes.append("refused")
    assert outcomes[:3] == ["checked"] * 3 and set(outcomes[3:]) == {"refused"}
    # The owner has not failed lately: its first check goes ahead, and succeeds.
    checks = world.hasher.checks
    assert service.authenticate(victim, owner).email == "ann@acme.test"
    assert world.hasher.checks == checks + 1
    # The refusals were charged to the attacker: it is throttled on any token now.
    with pytest.raises(RateLimited):
        service.authenticate("tks_" + "x" * 50, attacker)
    with pytest.raises(Unauthenticated):
        service.authenticate("tks_" + "x" * 50, owner)


def test_a_client_that_failed_lately_is_refused_at_a_token_being_guessed_at(
    world: World,
) -> None:
    service = _service(world, auth_failure_burst=20, auth_failure_refill_per_second=0.001,
                       lookup_failure_burst=2, lookup_failure_refill_per_second=0.001)
    victim = world.token("ann@acme.test", ["pass:read"])
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            service.authenticate(_wrong_secret(victim), "198.51.100.66")
    with pytest.raises(Unauthenticated):
        service.authenticate("tks_" + "x" * 50, "203.0.113.7")  # one failure of its own
    with pytest.raises(RateLimited):
        service.authenticate(victim, "203.0.113.7")
    assert service.authenticate(victim, "203.0.113.8").email == "ann@acme.test"


# Management: one caller's creations are bounded.


class GatedHasher(CountingHasher):
    """Real bcrypt whose hashes wait for the test to open the gate (a CreateToken in flight)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.hashing = threading.Semaphore(0)

    def hash(self, secret: str, claimant: Claimant = NOBODY) -> str:
        self.hashing.release()
        assert self.gate.wait(10)
        return super().hash(secret, claimant)


def test_one_caller_creates_at_most_a_few_tokens_at_once(world: World) -> None:
    hasher = GatedHasher()
    service = TokenService(Config(bcrypt_rounds=4, create_token_concurrency=2),
                           world.service.store, ScopeCatalog.default(), hasher,
                           clock=lambda: world.now[0])
    ann = world.caller(world.token("ann@acme.test", ["api_token:manage", "pass:read"]))
    other = world.caller(world.token("ann@acme.test", ["api_token:manage", "pass:read"]))
    results: list[object] = []

    def create(caller: Principal) -> None:
        with service.store.connection():
            try:
                results.append(service.create_token(caller, "t", ["pass:read"], None).info.id)
            except RateLimited as refused:
                results.append(refused)

    busy = [threading.Thread(target=create, args=(ann,)) for _ in range(2)]
    for thread in busy:
        thread.start()
    for _ in busy:
        assert hasher.hashing.acquire(timeout=10)  # both in flight, holding their slots
    create(ann)
    assert isinstance(results[-1], RateLimited) and results[-1].retry_after > 0
    third = threading.Thread(target=create, args=(other,))  # another caller: its own slots
    third.start()
    assert hasher.hashing.acquire(timeout=10)
    hasher.gate.set()
    for thread in [*busy, third]:
        thread.join()
    assert sum(isinstance(r, str) for r in results) == 3
    create(ann)  # the slots were given back
    assert isinstance(results[-1], str)
    hasher.close()
