"""Per-token rate limits end to end: gRPC and REST answers, in process and through a real
Redis, across two replicas and `--workers 2`, and Redis stopped and stalled under load."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import httpx
import pytest
import redis
from conftest import RunningServer, cli, make_config, start_server
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from redis_server import RedisServer
from rest_helpers import running_rest

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice.v1 import token_service_pb2_grpc as pb_grpc
from tokenservice_server import metrics, tokens
from tokenservice_server.config import RateLimit
from tokenservice_server.ratelimit import KEY_PREFIX

# No slack: at most `requests` calls in any window of the period.
LIMIT = RateLimit(100, 10.0)
MOST = 100
# These tests are about sharing a budget, not about a slow Redis: on a loaded
# machine a 100 ms answer is no fault (a slower one would fall back to each
# process's own counters, by design, and the test would measure that instead).
PATIENT = 2.0
GUESSER = "203.0.113.9"  # TEST-NET-3: the failing client names itself through x-forwarded-for


@contextlib.contextmanager
def serving(database_url: str, **overrides) -> Iterator[RunningServer]:
    running = start_server(make_config(database_url, **overrides))
    try:
        yield running
    finally:
        running.channel.close()
        running.server.stop(grace=1)


def new_token(server: RunningServer, scopes=("pass:read",)) -> str:
    email = f"user-{uuid.uuid4().hex[:12]}@example.com"
    server.add_user(email, "acme", list(scopes))
    return server.mint(email, list(scopes))


def refusal(error: grpc.RpcError) -> tuple[float, str]:
    """(RetryInfo delay in seconds, ErrorInfo reason) of a RESOURCE_EXHAUSTED answer."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    delay, reason = -1.0, ""
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            delay = info.retry_delay.ToNanoseconds() / 1e9
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            error_info = error_details_pb2.ErrorInfo()
            detail.Unpack(error_info)
            reason = error_info.reason
    return delay, reason


def outcomes() -> dict[str, float]:
    """tokenservice_authentications_total by outcome (in-process servers share the registry)."""
    page = metrics.render()[0].decode()
    found: dict[str, float] = {}
    for line in page.splitlines():
        if line.startswith("tokenservice_authentications_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            found[outcome] = float(line.rsplit(" ", 1)[1])
    return found


# In process: the answers a caller gets.


def test_grpc_over_the_limit_is_resource_exhausted_with_when_and_why(
    sqlite_database_url: str,
) -> None:
    # 3 per hour, all at once if the caller likes; nothing this test does is undone
    # by the clock while it runs.
    with serving(sqlite_database_url, rate_limit=RateLimit(3, 3600.0)) as ts:
        token = new_token(ts)
        lookup_id = tokens.parse(token, "tks_").lookup_id  # type: ignore[union-attr]
        before = outcomes()
        calls = [ts.authenticate(token) for _ in range(3)]
        assert [c.rate_limit.limit for c in calls] == [3, 3, 3]
        assert [c.rate_limit.remaining for c in calls] == [2, 1, 0]
        rested_in = calls[-1].rate_limit.reset_time.ToDatetime().timestamp() - time.time()
        # The calls leave the window an hour on, and at most a slice (6 minutes) more.
        assert 3590 < rested_in <= 3960
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as refused:
                ts.authenticate(token)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            delay, reason = refusal(refused.value)
            assert reason == "TOKEN_RATE_LIMITED" and 3590 < delay <= 3960

        def counted(outcome: str) -> float:
            return outcomes().get(outcome, 0) - before.get(outcome, 0)

        # Counted as the call ends, a moment after its answer left.
        wait_for(lambda: counted("rate_limited") == 3, f"rate_limited {counted('rate_limited')}")
        assert counted("ok") == 3 and counted("invalid") == 0
        # No failed authentication was counted: neither the token nor the client is
        # any closer to being throttled.
        service = ts.server.service
        assert service.lookup_failures.untouched(lookup_id)
        assert service.client_failures.untouched("127.0.0.1")
        # Another token has its own budget, and management calls are not counted.
        manager = ts.manager()
        for _ in range(3):
            ts.stub.ListTokens(pb.ListTokensRequest(), metadata=bearer(manager), timeout=10)
        assert ts.authenticate(manager).rate_limit.remaining == 2


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def test_rest_says_429_with_retry_after_and_ratelimit_headers(sqlite_database_url: str) -> None:
    with serving(sqlite_database_url, rate_limit=RateLimit(2, 36_000.0)) as ts, \
            running_rest(ts.target) as rest:
        token = new_token(ts)
        calls = [rest.client.post("/api/v1/authenticate", json={"token": token})
                 for _ in range(2)]
        # 2 per 10 hours: both at once; they leave the window 10 hours on, and at
        # most a slice (an hour) more.
        for reply, remaining in zip(calls, ("1", "0"), strict=True):
            assert reply.status_code == 200, reply.text
            assert reply.headers["ratelimit-limit"] == "2"
            assert reply.headers["ratelimit-remaining"] == remaining
            assert 36_000 - 10 < int(reply.headers["ratelimit-reset"]) <= 39_600
            assert reply.json()["rateLimit"]["remaining"] == remaining
        over = rest.client.post("/api/v1/authenticate", json={"token": token})
        assert over.status_code == 429, over.text
        assert over.json()["error"]["code"] == "rate_limited"
        assert 36_000 - 10 < int(over.headers["retry-after"]) <= 39_600
        assert "ratelimit-limit" not in over.headers


def test_with_limits_off_nothing_is_counted_or_told(sqlite_database_url: str) -> None:
    with serving(sqlite_database_url, rate_limit=None) as ts, running_rest(ts.target) as rest:
        token = new_token(ts)
        for _ in range(200):
            assert not ts.authenticate(token).HasField("rate_limit")
        reply = rest.client.post("/api/v1/authenticate", json={"token": token})
        assert reply.status_code == 200 and reply.json()["rateLimit"] is None
        assert not any(h.startswith("ratelimit-") for h in reply.headers)


# Through Redis, across replicas and worker processes.


@dataclass
class Call:
    target: int  # which stub
    sent: float
    received: float
    ok: bool


def hammer(stubs: list[pb_grpc.TokenServiceStub], token: str, seconds: float,
           threads_per_stub: int = 1) -> list[Call]:
    """Every stub called back to back for `seconds`; each answer OK or over the limit."""
    request = pb.AuthenticateRequest(token=token)
    calls: list[Call] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def run(index: int, stub: pb_grpc.TokenServiceStub) -> None:
        mine: list[Call] = []
        try:
            while time.monotonic() < stop:
                sent = time.monotonic()
                try:
                    stub.Authenticate(request, timeout=30)
                    ok = True
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                    assert refusal(error)[1] == "TOKEN_RATE_LIMITED"
                    ok = False
                mine.append(Call(index, sent, time.monotonic(), ok))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
        with lock:
            calls.extend(mine)

    threads = [threading.Thread(target=run, args=(i, stub))
               for i, stub in enumerate(stubs) for _ in range(threads_per_stub)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    return calls


def assert_within_the_limit(calls: list[Call], period: float = LIMIT.period_s,
                            log: Callable[[], str] = str) -> int:
    """The let-through calls whose answers fell in the first period, checked against the bound.

    A call's decision lies between its sending and its answer, so a call sent at or
    after t and answered before t + period was decided within that window.
    """
    successes = sorted((c for c in calls if c.ok), key=lambda c: c.sent)
    start = min(c.sent for c in calls)
    first_window = sum(1 for c in successes if c.received < start + period)
    # Every window that opens on a success holds no more than the bound either.
    most = max(sum(1 for c in successes if a.sent <= c.sent and c.received < a.sent + period)
               for a in successes)
    assert LIMIT.requests <= first_window <= MOST, (first_window, most, log())
    assert most <= MOST, (most, log())
    return first_window


def redis_keys(url: str, namespace: str) -> list[bytes]:
    with redis.Redis.from_url(url) as client:
        return client.keys(f"{KEY_PREFIX}{namespace}:*")


def test_replicas_share_a_token_s_budget_on_either_store(database_url: str, redis_url: str
                                                        ) -> None:
    """SQLite reads on the event loop, PostgreSQL's on a worker thread: the count is the
    same, in Redis. 2 per hour."""
    shared = dict(rate_limit=RateLimit(2, 3600.0), redis_url=redis_url,
                  redis_timeout_seconds=PATIENT)
    with serving(database_url, **shared) as a, serving(database_url, **shared) as b:
        token = new_token(a)
        assert a.authenticate(token).rate_limit.remaining == 1
        assert b.authenticate(token).rate_limit.remaining == 0
        for replica in (a, b, a):
            with pytest.raises(grpc.RpcError) as refused:
                replica.authenticate(token)
            assert refusal(refused.value)[1] == "TOKEN_RATE_LIMITED"


@pytest.mark.slow
def test_two_replicas_on_one_redis_share_one_budget(
    sqlite_database_url: str, redis_url: str
) -> None:
    shared = dict(rate_limit=LIMIT, redis_url=redis_url, redis_timeout_seconds=PATIENT)
    with serving(sqlite_database_url, **shared) as a, serving(sqlite_database_url, **shared) as b:
        token = new_token(a)
        stubs = [a.stub, b.stub]
        calls = hammer(stubs, token, LIMIT.period_s + 1.5, threads_per_stub=2)
        assert_within_the_limit(calls)
        # Both replicas answered, and let calls through: each alone would have let
        # through up to the bound, so the total proves they counted together.
        for index in (0, 1):
            assert any(c.ok for c in calls if c.target == index)
            assert any(not c.ok for c in calls if c.target == index)
        assert len(redis_keys(redis_url, "token")) == 1  # one key, the token's


@pytest.mark.slow
def test_serve_workers_2_on_one_redis_share_one_budget(
    sqlite_database_url: str, redis_url: str, spawn
) -> None:
    cli("migrate", "--database-url", sqlite_database_url, check=True)
    cli("user", "add", "--email", "w@example.com", "--org", "acme", "--permissions",
        "pass:read", "--database-url", sqlite_database_url, check=True)
    token = cli("token", "create", "--email", "w@example.com", "--name", "w", "--scopes",
                "pass:read", "--database-url", sqlite_database_url,
                check=True).stdout.strip().splitlines()[-1]
    # Sixteen callers from one address present a secret neither worker has verified
    # yet: one client's fair share of bcrypt would refuse some of those first checks
    # (RATE_LIMITED, not TOKEN_RATE_LIMITED). This test is about the token's limit.
    server = spawn(sqlite_database_url, "--workers", "2", "--rate-limit", str(LIMIT),
                   "--redis-url", redis_url,
                   env={"TOKENSERVICE_REDIS_TIMEOUT_SECONDS": str(PATIENT),
                        "TOKENSERVICE_BCRYPT_MAX_WAITING": "32",
                        "TOKENSERVICE_BCRYPT_MAX_PER_CLIENT": "32"})
    # Sixteen connections of their own: the kernel spreads them over both workers
    # (all on one: a chance in 2**15).
    channels = [grpc.insecure_channel(server.target, [("grpc.use_local_subchannel_pool", 1)])
                for _ in range(16)]
    try:
        calls = hammer([pb_grpc.TokenServiceStub(c) for c in channels], token,
                       LIMIT.period_s + 1.5)
    finally:
        for channel in channels:
            channel.close()
    assert_within_the_limit(calls, log=lambda: "\n".join(
        line for line in server.log().splitlines() if "redis" in line.lower()))
    assert len(redis_keys(redis_url, "token")) == 1


def test_a_guesser_gets_the_configured_failure_budget_across_two_replicas(
    sqlite_database_url: str, redis_url: str
) -> None:
    settings = dict(redis_url=redis_url, redis_timeout_seconds=PATIENT, auth_failure_burst=4,
                    auth_failure_refill_per_second=0.001, lookup_failure_burst=3,
                    lookup_failure_refill_per_second=0.001)
    with serving(sqlite_database_url, **settings) as a, \
            serving(sqlite_database_url, **settings) as b:
        guesser = (("x-forwarded-for", GUESSER),)

        def answer(stub: pb_grpc.TokenServiceStub, token: str, client=guesser) -> str:
            try:
                stub.Authenticate(pb.AuthenticateRequest(token=token), metadata=client,
                                  timeout=30)
                return "OK"
            except grpc.RpcError as error:
                return error.code().name

        # Unknown tokens, alternately on each replica: four failures in all, not eight.
        unknown = [tokens.new_token("tks_")[0] for _ in range(6)]
        answers = [answer((a.stub, b.stub)[i % 2], t) for i, t in enumerate(unknown)]
        assert answers == ["UNAUTHENTICATED"] * 4 + ["RESOURCE_EXHAUSTED"] * 2

        # A real token's lookup id guessed at with wrong secrets: three failed hash
        # checks in all, whichever replica ran them, empty its bucket. Then a client
        # that has failed lately is refused (and charged) on either replica, while a
        # client that has not is still checked: the owner is never locked out.
        real = new_token(a)
        parsed = tokens.parse(real, "tks_")
        assert parsed is not None
        wrong: list[str] = []
        for _ in range(5):
            body = "tks_" + parsed.lookup_id + tokens.new_token("tks_")[1].secret
            wrong.append(body + tokens.checksum(body))
        clients = ["198.51.100.0", "198.51.100.1", "198.51.100.2", "198.51.100.0",
                   "198.51.100.9"]
        answers = [answer((a.stub, b.stub)[i % 2], t, (("x-forwarded-for", clients[i]),))
                   for i, t in enumerate(wrong)]
        assert answers == ["UNAUTHENTICATED"] * 3 + ["RESOURCE_EXHAUSTED", "UNAUTHENTICATED"]
        # The budgets live in Redis, under ids that are no secret.
        assert len(redis_keys(redis_url, "auth-client")) >= 1
        assert len(redis_keys(redis_url, "auth-lookup")) == 1


# Redis faults: limits fall back to this process's counters, authentication goes on.


class Load:
    """A valid token and a flood of invalid ones, called until stopped; every answer kept."""

    def __init__(self, stub: pb_grpc.TokenServiceStub, valid: str, invalid: list[str]) -> None:
        self.valid_answers: dict[str, int] = {}
        self.invalid_answers: dict[str, int] = {}
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(stub, [valid], self.valid_answers, ())),
            threading.Thread(target=self._run, args=(stub, [valid], self.valid_answers, ())),
            threading.Thread(target=self._run, args=(stub, invalid, self.invalid_answers,
                                                     (("x-forwarded-for", GUESSER),))),
        ]
        self._lock = threading.Lock()

    def _run(self, stub: pb_grpc.TokenServiceStub, chosen: list[str], answers: dict[str, int],
             metadata: tuple[tuple[str, str], ...]) -> None:
        i = 0
        while not self._stop.is_set():
            token = chosen[i % len(chosen)]
            i += 1
            try:
                stub.Authenticate(pb.AuthenticateRequest(token=token), metadata=metadata,
                                  timeout=30)
                code = "OK"
            except grpc.RpcError as error:
                code = error.code().name
            with self._lock:
                answers[code] = answers.get(code, 0) + 1

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def valid_ok(self) -> int:
        with self._lock:
            return self.valid_answers.get("OK", 0)


def wait_for(what: Callable[[], bool], message: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, message
        time.sleep(0.05)


def healthz(rest_url: str) -> dict:
    reply = httpx.get(f"{rest_url}/healthz", timeout=10)
    assert reply.status_code == 200, reply.text  # Redis never takes the service down
    return reply.json()["dependencies"]


@pytest.mark.slow
def test_redis_stopped_stalled_and_back_under_load(
    sqlite_database_url: str, own_redis: RedisServer
) -> None:
    url = own_redis.url()
    # A limit no test call reaches: the check runs on every call, and refuses none;
    # each call is paid back 86 ms later, so the token's key stays in Redis under load.
    big = RateLimit(1_000_000, 86_400.0)
    with serving(sqlite_database_url, rate_limit=big, redis_url=url) as ts, \
            running_rest(ts.target) as rest:
        valid = new_token(ts)
        real = tokens.parse(valid, "tks_")
        assert real is not None
        wrong_body = "tks_" + real.lookup_id + tokens.new_token("tks_")[1].secret
        invalid = [tokens.new_token("tks_")[0], wrong_body + tokens.checksum(wrong_body),
                   valid[:-1] + ("A" if valid[-1] != "A" else "B")]
        assert healthz(rest.base_url) == {"database": "up", "redis": "up"}
        with Load(ts.stub, valid, invalid) as load:
            wait_for(lambda: load.valid_ok() > 50, "no load")
            # Counted in Redis (a loaded machine may have answered the first calls from
            # the process's counters, Redis being slower than its timeout).
            wait_for(lambda: bool(redis_keys(url, "token")), "never counted in Redis")

            own_redis.stop()
            wait_for(lambda: healthz(rest.base_url).get("redis") == "down",
                     "/healthz never said Redis was down")
            served = load.valid_ok()
            wait_for(lambda: load.valid_ok() > served + 50, "no calls served without Redis")

            own_redis.start()  # empty: no persistence, as after a crash
            wait_for(lambda: healthz(rest.base_url).get("redis") == "up",
                     "/healthz never saw Redis back")
            wait_for(lambda: bool(redis_keys(url, "token")), "limits never went back to Redis")

            own_redis.freeze()
            try:
                wait_for(lambda: healthz(rest.base_url).get("redis") == "down",
                         "/healthz never said a stalled Redis was down")
                served = load.valid_ok()
                wait_for(lambda: load.valid_ok() > served + 50, "no calls served while stalled")
            finally:
                own_redis.thaw()
            wait_for(lambda: healthz(rest.base_url).get("redis") == "up",
                     "/healthz never saw the stalled Redis recover")
            served = load.valid_ok()
            wait_for(lambda: load.valid_ok() > served + 50, "no calls served after recovery")
        # The valid token was never refused, and no invalid token ever got through.
        assert set(load.valid_answers) == {"OK"}, load.valid_answers
        assert "OK" not in load.invalid_answers, load.invalid_answers
        assert set(load.invalid_answers) <= {"UNAUTHENTICATED", "RESOURCE_EXHAUSTED"}


def test_a_limit_set_at_create_and_changed_by_update_is_the_one_counted(
    sqlite_database_url: str,
) -> None:
    from google.protobuf.duration_pb2 import Duration
    from google.protobuf.field_mask_pb2 import FieldMask

    # The service default would allow 600 a minute; the token's own says 1 an hour.
    with serving(sqlite_database_url) as ts:
        manager = ts.manager()
        made = ts.stub.CreateToken(
            pb.CreateTokenRequest(name="slow", scopes=["pass:read"],
                                  rate_limit=pb.RateLimit(requests=1,
                                                          period=Duration(seconds=3600))),
            metadata=bearer(manager), timeout=10)
        assert ts.authenticate(made.token).rate_limit.limit == 1
        with pytest.raises(grpc.RpcError) as refused:
            ts.authenticate(made.token)
        assert refusal(refused.value)[1] == "TOKEN_RATE_LIMITED"
        assert 3590 < refusal(refused.value)[0] <= 3960  # an hour, under that limit
        # Raised to 1000 an hour: the one call counted is far under it, so the next
        # call goes through at once.
        ts.stub.UpdateToken(
            pb.UpdateTokenRequest(
                api_token=pb.ApiToken(id=made.api_token.id, rate_limit=pb.RateLimit(
                    requests=1000, period=Duration(seconds=3600))),
                update_mask=FieldMask(paths=["rate_limit"])),
            metadata=bearer(manager), timeout=10)
        assert ts.authenticate(made.token).rate_limit.remaining == 998
        # Cleared: the service default again, within its interval (100 ms).
        ts.stub.UpdateToken(
            pb.UpdateTokenRequest(api_token=pb.ApiToken(id=made.api_token.id),
                                  update_mask=FieldMask(paths=["rate_limit"])),
            metadata=bearer(manager), timeout=10)

        def default_limit() -> bool:
            try:
                return ts.authenticate(made.token).rate_limit.limit == 600
            except grpc.RpcError:
                return False

        wait_for(default_limit, "the service default never applied")
