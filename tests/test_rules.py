"""The plain-function rules, tested without a server."""

from __future__ import annotations

import string
import threading
import time
import zlib

import pytest

from tokenservice_client import peer_address
from tokenservice_server import tokens
from tokenservice_server.config import ConfigError, load_config, to_environ
from tokenservice_server.crypto import BcryptHasher, VerifiedCache
from tokenservice_server.errors import MAX_VIOLATIONS, InvalidArgument, RateLimited, shown
from tokenservice_server.fairshare import Claimant, FairScheduler
from tokenservice_server.peers import TrustedProxies, client_address
from tokenservice_server.scopes import ScopeCatalog
from tokenservice_server.service import decode_page_token, encode_page_token, validate_name
from tokenservice_server.throttle import FailureBuckets, client_keys
from tokenservice_server.values import Cursor

ALLOWED = set(string.ascii_letters + string.digits + "_")


def test_token_format() -> None:
    raw, parts = tokens.new_token("tks_")
    assert raw.startswith("tks_") and set(raw) <= ALLOWED
    assert tokens.parse(raw, "tks_") == parts
    assert len(parts.secret) == 32  # 32 base62 characters: about 190 bits
    assert tokens.display_prefix(raw) == raw[:12]
    assert len({tokens.new_token("tks_")[1].lookup_id for _ in range(1000)}) == 1000


def test_checksum_rejects_every_single_character_change() -> None:
    raw, _ = tokens.new_token("tks_")
    for i in range(4, len(raw)):
        for replacement in "0aZ":
            if raw[i] != replacement:
                changed = raw[:i] + replacement + raw[i + 1:]
                assert tokens.parse(changed, "tks_") is None, (i, replacement)


def test_checksum_is_crc32_in_base62() -> None:
    raw, _ = tokens.new_token("tks_")
    body, check = raw[:-6], raw[-6:]
    value = 0
    for ch in check:
        value = value * 62 + tokens.ALPHABET.index(ch)
    assert value == zlib.crc32(body.encode())


@pytest.mark.parametrize("bad", ["", "tks_", "sk_live_abc", "tks_" + "a" * 50, "x" * 54,
                                 "tks_" + "é" * 50])
def test_parse_rejects_look_alikes(bad: str) -> None:
    assert tokens.parse(bad, "tks_") is None


def test_bcrypt_input_stays_under_72_bytes() -> None:
    _, parts = tokens.new_token("tks_")
    assert len(parts.secret.encode()) <= 72
    hasher = BcryptHasher(rounds=4, slots=1, max_waiting=1)
    hashed = hasher.hash(parts.secret)
    assert hasher.verify(parts.secret, hashed)
    assert not hasher.verify(parts.secret[::-1], hashed)
    assert not hasher.verify(parts.secret, "not a bcrypt hash")
    with pytest.raises(ValueError):
        hasher.hash("x" * 73)


def test_needs_rehash_when_the_hash_is_weaker_than_configured() -> None:
    weak = BcryptHasher(rounds=4, slots=1, max_waiting=1).hash("s")
    assert not BcryptHasher(rounds=4, slots=1, max_waiting=1).needs_rehash(weak)
    assert BcryptHasher(rounds=5, slots=1, max_waiting=1).needs_rehash(weak)
    assert BcryptHasher(rounds=4, slots=1, max_waiting=1).needs_rehash("not a bcrypt hash")


def test_verified_cache_is_keyed_by_an_hmac_and_bound_to_the_hash() -> None:
    cache = VerifiedCache(max_entries=2)
    digest = cache.digest("lookup", "secret")
    assert b"secret" not in digest and len(digest) == 32
    assert VerifiedCache(2).digest("lookup", "secret") != digest  # a key per process
    cache.add(digest, "$2b$hash")
    assert cache.is_verified(digest, "$2b$hash")
    assert not cache.is_verified(digest, "$2b$other-hash")
    for i in range(3):
        cache.add(cache.digest("l", str(i)), "h")
    assert len(cache) == 2 and not cache.is_verified(digest, "$2b$hash")


class Gate:
    """Work that runs until the test lets it finish, recording the order it started in."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self._open: dict[str, threading.Event] = {}

    def job(self, name: str):
        self._open[name] = threading.Event()

        def work() -> str:
            self.started.append(name)
            assert self._open[name].wait(10)
            return name

        return work

    def finish(self, name: str) -> None:
        self._open[name].set()


def _wait_started(gate: Gate, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(gate.started) < count:
        assert time.monotonic() < deadline, gate.started
        time.sleep(0.001)


def test_bcrypt_refuses_what_may_not_wait_for_checks_and_hashes_alike() -> None:
    hashed = BcryptHasher(rounds=4, slots=1, max_waiting=1).hash("s")
    busy = BcryptHasher(rounds=4, slots=1, max_waiting=0)
    gate = Gate()
    running = busy._scheduler.submit(Claimant("o", "a"), gate.job("a1"))
    _wait_started(gate, 1)
    with pytest.raises(RateLimited):
        busy.verify("s", hashed, Claimant("o", "b"))
    with pytest.raises(RateLimited):
        busy.hash("s", Claimant("o", "b"))  # CreateToken's hash shares the threads
    gate.finish("a1")
    assert running.result(10) == "a1"
    assert busy.verify("s", hashed, Claimant("o", "b"))  # free again


def test_one_client_waits_in_its_own_queue_and_a_newcomer_goes_first() -> None:
    scheduler = FairScheduler(slots=1, max_waiting=8, per_client=4)
    gate = Gate()
    flood = Claimant("evil", "198.51.100.66", failing=True)
    jobs = [scheduler.submit(flood, gate.job(f"f{i}")) for i in range(4)]
    with pytest.raises(RateLimited):  # its own cap: nobody else pays for it
        scheduler.submit(flood, gate.job("f4"))
    _wait_started(gate, 1)
    other_org = scheduler.submit(Claimant("acme", "203.0.113.7"), gate.job("v"))
    same_org = scheduler.submit(Claimant("evil", "203.0.113.8"), gate.job("w"))
    for name in ("f0", "v", "w", "f1", "f2", "f3"):
        _wait_started(gate, len(gate.started))
        gate.finish(name)
    assert [j.result(10) for j in (*jobs, other_org, same_org)] == [
        "f0", "f1", "f2", "f3", "v", "w"]
    assert gate.started == ["f0", "v", "w", "f1", "f2", "f3"]


def test_a_failing_client_never_takes_the_last_thread() -> None:
    scheduler = FairScheduler(slots=2, max_waiting=8, per_client=4)
    gate = Gate()
    flood = [Claimant("evil", f"198.51.100.{i}", failing=True) for i in range(3)]
    for i, claimant in enumerate(flood):
        scheduler.submit(claimant, gate.job(f"f{i}"))
    _wait_started(gate, 1)
    assert scheduler.running == 1 and scheduler.waiting == 2  # one thread kept free
    victim = scheduler.submit(Claimant("acme", "203.0.113.7"), gate.job("v"))
    _wait_started(gate, 2)
    assert gate.started == ["f0", "v"]  # at once, not after somebody's bcrypt
    gate.finish("v")
    assert victim.result(10) == "v"
    good = [scheduler.submit(Claimant("acme", "203.0.113.7"), gate.job(f"g{i}"))
            for i in range(2)]
    gate.finish("f0")
    _wait_started(gate, 4)  # a client in good standing may use every thread
    assert gate.started[2:] == ["g0", "g1"]
    for name in ("g0", "g1", "f1", "f2"):
        gate.finish(name)
    assert [g.result(10) for g in good] == ["g0", "g1"]


def test_a_full_queue_refuses_the_flooder_not_the_newcomer() -> None:
    scheduler = FairScheduler(slots=1, max_waiting=3, per_client=10)
    gate = Gate()
    flood = Claimant("evil", "198.51.100.66")
    jobs = [scheduler.submit(flood, gate.job(f"f{i}")) for i in range(4)]  # 1 runs, 3 wait
    _wait_started(gate, 1)
    with pytest.raises(RateLimited):  # the flooder itself is refused when full
        scheduler.submit(flood, gate.job("f4"))
    victim = scheduler.submit(Claimant("acme", "203.0.113.7"), gate.job("v"))
    with pytest.raises(RateLimited):  # the flood's last waiting job made room
        jobs[-1].result(10)
    for name in ("f0", "v", "f1", "f2"):
        _wait_started(gate, len(gate.started))
        gate.finish(name)
    assert victim.result(10) == "v" and gate.started == ["f0", "v", "f1", "f2"]


def test_a_withdrawn_check_gives_its_place_back() -> None:
    scheduler = FairScheduler(slots=1, max_waiting=1, per_client=1)
    gate = Gate()
    scheduler.submit(Claimant("o", "a"), gate.job("a"))
    _wait_started(gate, 1)
    waiting = scheduler.submit(Claimant("o", "b"), gate.job("b"))
    assert waiting.cancel()  # its caller gave up (a cancelled RPC)
    assert scheduler.waiting == 0
    again = scheduler.submit(Claimant("o", "b"), gate.job("b2"))
    gate.finish("a")
    gate.finish("b2")
    assert again.result(10) == "b2" and "b" not in gate.started


def test_failure_buckets_throttle_and_refill() -> None:
    now = [0.0]
    buckets = FailureBuckets(burst=3, per_second=1.0, clock=lambda: now[0])
    assert buckets.untouched("a")
    for _ in range(3):
        assert buckets.retry_after("a") == 0
        buckets.fail("a")
    assert buckets.retry_after("a") == pytest.approx(1.0)
    assert buckets.retry_after("b") == 0  # per key
    now[0] = 1.5
    assert buckets.retry_after("a") == 0 and not buckets.untouched("a")
    now[0] = 10
    assert buckets.untouched("a")


def test_buckets_stay_bounded() -> None:
    buckets = FailureBuckets(burst=1, per_second=1.0, max_keys=10, clock=lambda: 0.0)
    for i in range(100):
        buckets.fail(str(i))
    # Only the 10 most recent failures are remembered: the oldest keys start afresh.
    assert [buckets.untouched(str(i)) for i in range(100)] == [True] * 90 + [False] * 10


@pytest.mark.parametrize(
    ("name", "ok"),
    [("CI/CD Pipeline", True), ("  trimmed  ", True), ("x" * 200, True), ("x" * 201, False),
     ("", False), ("\x7f", False), ("a\nb", False), ("a\u202ab", False), ("a\u2069b", False),
     ("emoji 🚀", True), ("a\u200db", True)],
)
def test_names(name: str, ok: bool) -> None:
    clean, why = validate_name(name)
    assert (why is None) == ok
    if ok:
        assert clean == name.strip()


def test_page_tokens_round_trip_and_reject_garbage() -> None:
    cursor = Cursor(1_700_000_000_000_000, "0b6f6f0c-7d1e-4c39-9d6a-5b3f0ad9b8c1")
    token = encode_page_token(cursor)
    assert set(token) <= ALLOWED | {"-"}
    assert decode_page_token(token) == cursor
    for bad in ["", "x", "Mjp4Onk", token[:-3]]:
        with pytest.raises(InvalidArgument):
            decode_page_token(bad)


def test_config_precedence_flags_over_environment_over_defaults() -> None:
    assert load_config({}, {}).grpc_port == 50051
    env = {"TOKENSERVICE_GRPC_PORT": "6000", "TOKENSERVICE_BCRYPT_ROUNDS": "5"}
    assert load_config({}, env).grpc_port == 6000
    config = load_config({"grpc_port": 7000}, env)
    assert (config.grpc_port, config.bcrypt_rounds) == (7000, 5)
    with pytest.raises(ConfigError):
        load_config({}, {"TOKENSERVICE_BCRYPT_ROUNDS": "3"})
    with pytest.raises(ConfigError):
        load_config({}, {"TOKENSERVICE_HTTP_PORT": "eighty"})
    with pytest.raises(AttributeError):
        config.grpc_port = 1  # frozen


@pytest.mark.parametrize(
    "name",
    ["pass:read ", "\tpass:read", "pass\nread", "pass:re\u0000ad", "\u212aiosk:use",
     "\uff50ass:read", "pass:\u200bread", ""],
)
def test_a_scopes_file_may_only_hold_canonical_names(tmp_path, name: str) -> None:
    path = tmp_path / "scopes.toml"
    escaped = "".join(c if " " < c < "\x7f" else f"\\U{ord(c):08x}" for c in name)
    path.write_text(f'[scopes."{escaped}"]\ndescription = "d"\n', encoding="utf-8")
    with pytest.raises(ValueError, match="scope name"):
        ScopeCatalog.from_toml(str(path))


def test_a_catalog_may_not_hold_two_spellings_of_one_name(tmp_path) -> None:
    path = tmp_path / "scopes.toml"
    path.write_text('[scopes."pass:read"]\n[scopes."Pass:Read"]\n', encoding="utf-8")
    with pytest.raises(ValueError, match="twice"):
        ScopeCatalog.from_toml(str(path))
    assert ScopeCatalog.default().get("PASS:READ") is None
    assert ScopeCatalog.default().get("pass:read") is not None


def test_an_error_echoes_a_bounded_amount_of_what_the_caller_sent() -> None:
    error = InvalidArgument([("scopes", f"{shown('s' * 20_000)} is unknown")] * 300)
    assert len(error.violations) == MAX_VIOLATIONS
    assert error.violations[-1][1] == f"and {300 - MAX_VIOLATIONS + 1} more problems, not listed"
    assert all(len(d) <= 160 for _, d in error.violations)
    assert len(error.message) <= 400
    assert shown("\u202eevil\x00") == "'\\u202eevil\\x00'"  # ASCII only: nothing to hide in
    assert "(20000 characters)" in shown("s" * 20_000)


def test_a_configuration_survives_the_trip_through_the_environment() -> None:
    config = load_config(
        {"database_url": "postgresql://u:p%40ss@db/ts", "scopes_file": "/etc/ts.toml",
         "trusted_proxies": "10.0.0.0/8, ::1", "rest_enabled": False, "grpc_port": 0},
        {"TOKENSERVICE_AUTH_FAILURE_REFILL_PER_SECOND": "0.1"},
    )
    assert load_config({}, to_environ(config)) == config
    assert load_config({}, to_environ(load_config({}, {}))) == load_config({}, {})


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:192.0.2.7:5000", "192.0.2.7"),
        ("ipv6:%5B::1%5D:5000", "::1"),  # what grpcio reports today
        ("ipv6:[::1]:5000", "::1"),
        ("ipv6:%5B2001:DB8:0:0::0001%5D:443", "2001:db8::1"),
        ("ipv6:%5B::ffff:192.0.2.7%5D:80", "192.0.2.7"),  # IPv4-mapped: the IPv4 client
        ("ipv6:%5Bfe80::1%25eth0%5D:80", "fe80::1%eth0"),
        ("unix:/run/ts.sock", None),
        ("ipv4:not-an-address:1", None),
    ],
)
def test_grpc_peers_are_read_as_one_canonical_address(peer: str, address: str | None) -> None:
    assert peer_address(peer) == address


def test_trusted_proxies_are_addresses_or_ranges_and_only_they_name_the_client() -> None:
    trusted = TrustedProxies(["127.0.0.1", "::1", "10.0.0.0/8", "fd00::/64"])
    assert "10.200.3.4" in trusted and "fd00::7" in trusted and "::1" in trusted
    assert "11.0.0.1" not in trusted and "fd00:0:0:1::7" not in trusted and None not in trusted
    via_shim = client_address("ipv6:%5B::1%5D:4000", "203.0.113.9", trusted)
    assert via_shim == "203.0.113.9"
    assert client_address("ipv4:10.1.1.1:4000", "x, 2001:DB8::9", trusted) == "2001:db8::9"
    assert client_address("ipv4:198.51.100.1:4000", "203.0.113.9", trusted) == "198.51.100.1"
    assert client_address("ipv4:10.1.1.1:4000", "garbage", trusted) == "10.1.1.1"
    with pytest.raises(ConfigError):
        load_config({}, {"TOKENSERVICE_TRUSTED_PROXIES": "10.0.0.0/33"})
    with pytest.raises(ConfigError):
        load_config({}, {"TOKENSERVICE_TRUSTED_PROXIES": "proxy.internal"})
    # Loopback by default; `none` trusts no peer to name another client.
    assert load_config({}, {}).trusted_proxies == ("127.0.0.1", "::1")
    nobody = TrustedProxies(load_config({}, {"TOKENSERVICE_TRUSTED_PROXIES": "none"})
                            .trusted_proxies)
    assert client_address("ipv4:127.0.0.1:4000", "203.0.113.9", nobody) == "127.0.0.1"


def test_an_ipv6_client_counts_against_its_address_and_its_slash_64() -> None:
    assert client_keys("192.0.2.7") == ("192.0.2.7",)
    assert client_keys("2001:db8:1:2:3:4:5:6") == ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64")
    assert client_keys("unix:/run/ts.sock") == ("unix:/run/ts.sock",)
