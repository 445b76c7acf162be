"""`python -m bench`: tokenservice under h2load beside a bare grpc.aio server, in one run.

Every server of the run starts at once and stays up: the bare grpc.aio
server (the ceiling), one `tokenservice serve` per store size, one logging at
WARNING (what the per-RPC log line costs), one and two worker processes for
`--workers`, the peer (djangorestframework-api-key on gunicorn, bench/peer_drf/)
and, on PostgreSQL, one on a SQLite store of the smallest size. Then every
phase runs once per round, rounds interleaved in a rotating order, so a
machine that drifts moves every phase alike, and each ratio is taken within
a round. h2load (and the server) are pinned to cores of
their own with taskset when there are two or more.

Nothing tracked is written unless --update-doc is given: results go to a new
file under bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import platform
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from . import h2load
from .bare import PATH as BARE_PATH
from .dataset import PREFIX, Dataset, Sample
from .h2load import GRPC_HEADERS, JSON_HEADERS, Load, Outcome, grpc_frame
from .servers import (
    HOST,
    Server,
    load_peer,
    process_cpu_seconds,
    start_bare,
    start_peer,
    start_tokenservice,
    tree_cpu_seconds,
    wait_ready,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SERVICE = "/tokenservice.v1.TokenService/"
AUTHENTICATE = SERVICE + "Authenticate"
HEALTH = "/grpc.health.v1.Health/Check"
# The flood names itself a client of its own through x-forwarded-for, which the
# server honours from 127.0.0.1 (the REST shim's address): a second client, as
# on a real network. An address from TEST-NET-3, never routed.
FLOOD_CLIENT = "203.0.113.9"
# Phase groups, in the order of a round; `size` and `workers` expand per size / per worker count.
# `peer` (drf-api-key on gunicorn, always on SQLite) runs by default on SQLite, `sqlite`
# (the same Authenticate on a SQLite store, beside the PostgreSQL ones) on PostgreSQL.
GROUPS = ("bare", "health", "auth", "size", "rest", "flood", "nolog", "nometrics", "workers",
          "limits", "peer", "sqlite", "list", "create", "cold")
QUICK_GROUPS = ("bare", "health", "auth", "size", "rest", "flood", "nolog", "nometrics",
                "workers", "limits", "peer", "sqlite")
BACKEND_ONLY = {"peer": "sqlite", "sqlite": "postgres"}
PEER = "drf-api-key"
PROFILED = ("auth", "rest", "w2_rest")  # --profile: py-spy under these phases' loads
PEER_WORKERS = 2
# The `limits` phases: a limit no call of the run reaches (T = 1.2 µs), so every
# call is let through and the phase prices the check itself, not refusals.
BENCH_LIMIT = "50000000/60s"
LIMIT_SERVERS = (
    ("lim_off", "Authenticate, warm, rate limits off"),
    ("lim_local", "Authenticate, warm, rate limits in process"),
    ("lim_redis", "Authenticate, warm, rate limits in Redis"),
)


class Deadline(Exception):
    pass


@dataclass
class Phase:
    name: str
    title: str
    server: str  # key into Bench.servers
    load: Load | None  # None: the Python driver (cold Authenticate)
    method: str = ""  # what the server logs for it ("" when the server logs nothing)
    flood: Load | None = None  # a second h2load at the same time
    probe: Callable[[], str] | None = None  # one call like the load's; returns its status
    expect_failures: tuple[str, ...] = ()  # statuses the server may log besides OK
    # Sized in calls (`h2load -n`), not seconds: re-sized to `duration` from each round's rate.
    by_count: bool = False


def invalid_token(rng: random.Random) -> str:
    """Well-formed, right checksum, unknown lookup id: the server reads the store, then refuses."""
    from tokenservice_server import tokens

    body = PREFIX + "".join(rng.choices(tokens.ALPHABET, k=tokens.LOOKUP_LEN + tokens.SECRET_LEN))
    return body + tokens.checksum(body)


def _n(tokens: int) -> str:
    if tokens >= 1_000_000 and tokens % 1_000_000 == 0:
        return f"{tokens // 1_000_000}M"
    if tokens >= 1_000 and tokens % 1_000 == 0:
        return f"{tokens // 1_000}k"
    return str(tokens)


def split_cpus(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(driver cores, server cores): the first core drives, the rest serve; None: no pinning."""
    cores = sorted(os.sched_getaffinity(0))
    if not pin or len(cores) < 2:
        return None, None
    return {cores[0]}, set(cores[1:])


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.tmp = Path(tempfile.mkdtemp(prefix="tokenservice-bench-"))
        self.rng = random.Random(66)
        self.cluster: Any = None
        self.redis: Any = None
        self.servers: dict[str, Server] = {}
        self.channels: dict[str, Any] = {}
        self.pool: ProcessPoolExecutor | None = None
        self.all_cpus = set(os.sched_getaffinity(0))
        self.driver_cpus, self.server_cpus = split_cpus(not args.no_pin)
        self.samples: dict[int, Sample] = {}
        self.sqlite_sample: Sample | None = None
        self.peer_key = ""
        self.best_rate: dict[str, float] = {}
        self.crashes: dict[str, dict[str, Any]] = {}
        self.peer_secret = secrets.token_urlsafe(32)  # Django's SECRET_KEY, this run only
        self.rss: dict[str, dict[str, float]] = {}
        self.load_seconds: dict[int, float] = {}

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)

    def db_cpu_seconds(self, server: str) -> float | None:
        """PostgreSQL's CPU so far, for a server whose store it is (None: SQLite, or none)."""
        if self.cluster is None or server in ("bare", "ts_sqlite", "peer"):
            return None
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.cluster.data / "postmaster.pid").read_text().split()[0])
            return tree_cpu_seconds(pid)
        return None

    def check_time(self) -> None:
        if time.monotonic() - self.started > self.args.max_minutes * 60:
            raise Deadline(f"the run passed --max-minutes {self.args.max_minutes}")

    # The stores: one database per size, each loaded by dataset.py.

    def database_url(self, n: int, backend: str = "") -> str:
        if (backend or self.args.backend) == "sqlite":
            return f"sqlite:///{self.tmp / f'bench-{n}.db'}"
        if self.cluster is None:
            sys.path.insert(0, str(ROOT / "tests"))
            from pgcluster import PgCluster  # the tests' throwaway cluster, reused as is

            # PostgreSQL is the server's side: its processes inherit these cores.
            if self.server_cpus:
                os.sched_setaffinity(0, self.server_cpus)
            try:
                self.cluster = PgCluster().start()
            finally:
                os.sched_setaffinity(0, self.all_cpus)
        return self.cluster.create_database(f"bench_{n}")

    def load_stores(self) -> dict[int, str]:
        a = self.args
        urls: dict[int, str] = {}
        hashes = None
        for i, n in enumerate(a.sizes):
            url = self.database_url(n)
            dataset = Dataset(url, a.rounds)
            if hashes is None:
                self.log(f"hashing {len(dataset.secrets)} distinct secrets at {a.rounds} rounds")
            dataset.setup(hashes)
            hashes = dataset.hashes
            self.load_seconds[n] = round(dataset.grow(n), 1)
            cold = self.cold_tokens_needed() if i == 0 else 0
            self.samples[n] = dataset.sample(1, cold)
            dataset.close()
            urls[n] = url
            self.log(f"{_n(n)} tokens loaded in {self.load_seconds[n]} s")
        base = a.sizes[0]
        if "sqlite" in a.groups and a.backend != "sqlite":
            url = self.database_url(base, "sqlite")
            dataset = Dataset(url, a.rounds)
            dataset.setup(hashes)
            dataset.grow(base)
            self.sqlite_sample = dataset.sample(1, 0)
            dataset.close()
            urls[-1] = url
            self.log(f"{_n(base)} tokens loaded on SQLite too")
        if "peer" in a.groups:
            t0 = time.monotonic()
            self.peer_key = load_peer(self.tmp / "peer.db", base, self.peer_secret)
            self.log(f"{PEER}: {_n(base)} keys loaded in {time.monotonic() - t0:.1f} s")
        return urls

    def cold_tokens_needed(self) -> int:
        if "cold" not in self.args.groups:
            return 0
        # At most a few bcrypt checks a second per core; a generous margin for faster machines.
        return int(self.args.duration * self.args.repeats * 40) + 40

    # The servers.

    def start_servers(self, urls: dict[int, str]) -> None:
        a = self.args
        base = a.sizes[0]
        groups = set(a.groups)
        kw = {"rounds": a.rounds}
        self.servers["bare"] = start_bare(self.tmp, self.server_cpus)
        for n in a.sizes:
            self.servers[f"ts_{n}"] = start_tokenservice(
                f"ts_{n}", urls[n], self.tmp, self.server_cpus, rest=(n == base), **kw)
        if "nolog" in groups:
            self.servers["nolog"] = start_tokenservice(
                "nolog", urls[base], self.tmp, self.server_cpus, log_level="WARNING", rest=False,
                **kw)
        if "nometrics" in groups:
            self.servers["nometrics"] = start_tokenservice(
                "nometrics", urls[base], self.tmp, self.server_cpus, metrics=False, rest=False,
                **kw)
        if "workers" in groups:
            # Both worker counts get every core: one process cannot use a second one,
            # two can; the driver stays pinned to its own core and competes for it.
            for w in (1, 2):
                self.servers[f"w{w}"] = start_tokenservice(
                    f"w{w}", urls[base], self.tmp, None, workers=w, **kw)
        if "limits" in groups:
            # Three servers alike but for their limits, on the smallest store.
            redis_url = self.start_redis()
            for name, limit, redis in (("lim_off", "off", None),
                                       ("lim_local", BENCH_LIMIT, None),
                                       ("lim_redis", BENCH_LIMIT, redis_url)):
                self.servers[name] = start_tokenservice(
                    name, urls[base], self.tmp, self.server_cpus, rest=False,
                    rate_limit=limit, redis_url=redis, **kw)
        if "peer" in groups:
            # Every core, as `serve --workers 2`: one sync worker per core.
            self.servers["peer"] = start_peer("peer", self.tmp / "peer.db", self.peer_secret,
                                              self.tmp, None, PEER_WORKERS)
        if -1 in urls:
            self.servers["ts_sqlite"] = start_tokenservice(
                "ts_sqlite", urls[-1], self.tmp, self.server_cpus, rest=False, **kw)
        wait_ready(list(self.servers.values()))
        self.log("servers ready: " + ", ".join(
            f"{s.name} (cores {','.join(map(str, sorted(s.cpus or self.all_cpus)))})"
            for s in self.servers.values()))

    def start_redis(self) -> str:
        """A throwaway redis-server (the tests' own helper) on the servers' cores."""
        sys.path.insert(0, str(ROOT / "tests"))
        from redis_server import RedisServer

        # Redis is the server's side, as PostgreSQL is: it inherits these cores.
        if self.server_cpus:
            os.sched_setaffinity(0, self.server_cpus)
        try:
            self.redis = RedisServer().start()
        finally:
            os.sched_setaffinity(0, self.all_cpus)
        self.log(f"redis-server on {self.redis.url()}")
        return self.redis.url()

    def channel(self, name: str) -> Any:
        import grpc

        if name not in self.channels:
            self.channels[name] = grpc.insecure_channel(f"{HOST}:{self.servers[name].grpc_port}")
        return self.channels[name]

    def grpc_probe(self, server: str, path: str, body: bytes,
                   metadata: tuple[tuple[str, str], ...] = ()) -> Callable[[], str]:
        """One call with the load's own request bytes: its gRPC status, which h2load cannot see."""
        import grpc

        def probe() -> str:
            call = self.channel(server).unary_unary(path)
            try:
                call(body[5:], timeout=30, metadata=metadata or None)
                return "OK"
            except grpc.RpcError as e:
                return e.code().name

        return probe

    def rest_probe(self, server: str, body: bytes,
                   headers: tuple[tuple[str, str], ...] = JSON_HEADERS,
                   field: str = "tokenId") -> Callable[[], str]:
        """One REST call like the load's: OK when it answers 200 and names whose token it is."""
        def probe() -> str:
            conn = http.client.HTTPConnection(HOST, self.servers[server].http_port, timeout=30)
            try:
                conn.request("POST", "/api/v1/authenticate", body, dict(headers))
                reply = conn.getresponse()
                data = json.loads(reply.read() or b"{}")
                return "OK" if reply.status == 200 and data.get(field) else \
                    f"HTTP_{reply.status}"
            finally:
                conn.close()

        return probe

    # The phases.

    def body(self, name: str, data: bytes) -> Path:
        path = self.tmp / f"{name}.body"
        path.write_bytes(data)
        return path

    def phases(self) -> list[Phase]:
        from tokenservice.v1 import token_service_pb2 as pb

        a = self.args
        base = a.sizes[0]
        groups = set(a.groups)

        def url(server: str, path: str) -> str:
            return f"http://{HOST}:{self.servers[server].grpc_port}{path}"

        def grpc_load(server: str, path: str, body: Path, **kw: Any) -> Load:
            kw.setdefault("connections", a.connections)
            kw.setdefault("streams", a.streams)
            return Load(url(server, path), body, duration=a.duration, warmup=a.warmup, **kw)

        def auth(n: int) -> tuple[Path, bytes]:
            raw = grpc_frame(pb.AuthenticateRequest(token=self.samples[n].warm[0])
                             .SerializeToString())
            return self.body(f"auth-{n}", raw), raw

        empty = self.body("empty", grpc_frame(b""))
        auth_body, auth_raw = auth(base)
        out: list[Phase] = []
        if "bare" in groups:
            out.append(Phase("bare", "bare grpc.aio server, empty unary method (the ceiling)",
                             "bare", grpc_load("bare", BARE_PATH, empty),
                             probe=self.grpc_probe("bare", BARE_PATH, grpc_frame(b""))))
        ts = f"ts_{base}"
        if "health" in groups:
            out.append(Phase("health", "tokenservice health Check", ts,
                             grpc_load(ts, HEALTH, empty), HEALTH,
                             probe=self.grpc_probe(ts, HEALTH, grpc_frame(b""))))
        if "auth" in groups:
            out.append(Phase("auth", f"Authenticate, warm ({_n(base)} tokens)", ts,
                             grpc_load(ts, AUTHENTICATE, auth_body), AUTHENTICATE,
                             probe=self.grpc_probe(ts, AUTHENTICATE, auth_raw)))
        if "size" in groups:
            for n in a.sizes[1:]:
                body, raw = auth(n)
                out.append(Phase(f"auth_{n}", f"Authenticate, warm ({_n(n)} tokens)", f"ts_{n}",
                                 grpc_load(f"ts_{n}", AUTHENTICATE, body), AUTHENTICATE,
                                 probe=self.grpc_probe(f"ts_{n}", AUTHENTICATE, raw)))
        rest_raw = json.dumps({"token": self.samples[base].warm[0]}).encode()
        rest_body = self.body("rest", rest_raw)

        def rest_load(server: str) -> Load:
            return Load(f"http://{HOST}:{self.servers[server].http_port}/api/v1/authenticate",
                        rest_body, connections=a.rest_connections, streams=1,
                        duration=a.duration, warmup=a.warmup, h1=True, headers=JSON_HEADERS)

        if "rest" in groups:
            out.append(Phase("rest", "REST Authenticate (h2load --h1)", ts, rest_load(ts),
                             AUTHENTICATE, probe=self.rest_probe(ts, rest_raw)))
        if "flood" in groups:
            bad = grpc_frame(pb.AuthenticateRequest(token=invalid_token(self.rng))
                             .SerializeToString())
            flood = Load(url(ts, AUTHENTICATE), self.body("invalid", bad),
                         connections=a.connections, streams=a.streams,
                         duration=a.duration + a.warmup + 0.5, warmup=0.1,
                         headers=(*GRPC_HEADERS, ("x-forwarded-for", FLOOD_CLIENT)))
            out.append(Phase("flood", "Authenticate, warm, beside an invalid-token flood", ts,
                             grpc_load(ts, AUTHENTICATE, auth_body), AUTHENTICATE, flood=flood,
                             probe=self.grpc_probe(ts, AUTHENTICATE, auth_raw),
                             expect_failures=("UNAUTHENTICATED", "RESOURCE_EXHAUSTED")))
        if "nolog" in groups:
            out.append(Phase("nolog", "Authenticate, warm, log level WARNING (no line per RPC)",
                             "nolog", grpc_load("nolog", AUTHENTICATE, auth_body),
                             probe=self.grpc_probe("nolog", AUTHENTICATE, auth_raw)))
        if "nometrics" in groups:
            out.append(Phase("nometrics", "Authenticate, warm, metrics off (METRICS=0)",
                             "nometrics", grpc_load("nometrics", AUTHENTICATE, auth_body),
                             probe=self.grpc_probe("nometrics", AUTHENTICATE, auth_raw)))
        if "workers" in groups:
            # The kernel spreads connections, not calls, over the workers (SO_REUSEPORT):
            # 4 would often land 3 to 1, so these phases open 16 (same calls in flight).
            spread = {"connections": 16, "streams": max(1, a.connections * a.streams // 16)}
            for w in (1, 2):
                out.append(Phase(f"w{w}_auth", f"Authenticate, warm, serve --workers {w}"
                                 " (all cores)", f"w{w}",
                                 grpc_load(f"w{w}", AUTHENTICATE, auth_body, **spread),
                                 AUTHENTICATE,
                                 probe=self.grpc_probe(f"w{w}", AUTHENTICATE, auth_raw)))
                out.append(Phase(f"w{w}_rest", f"REST Authenticate, serve --workers {w}"
                                 " (all cores)", f"w{w}", rest_load(f"w{w}"), AUTHENTICATE,
                                 probe=self.rest_probe(f"w{w}", rest_raw)))
        if "limits" in groups:
            for name, title in LIMIT_SERVERS:
                out.append(Phase(name, title, name, grpc_load(name, AUTHENTICATE, auth_body),
                                 AUTHENTICATE,
                                 probe=self.grpc_probe(name, AUTHENTICATE, auth_raw)))
        if "peer" in groups:
            # gunicorn's sync workers close every connection, and h2load -D then hangs at
            # the end of the window: the peer runs -n calls, sized to `duration` seconds
            # from its previous rate (prime() measures the first).
            headers = (*JSON_HEADERS, ("authorization", f"Api-Key {self.peer_key}"))
            peer_body = b"{}"
            out.append(Phase(
                "peer", f"{PEER}: Django + DRF, HasAPIKey + get_from_key, gunicorn"
                f" {PEER_WORKERS} sync workers (all cores)", "peer",
                Load(f"http://{HOST}:{self.servers['peer'].http_port}/api/v1/authenticate",
                     self.body("peer", peer_body), connections=a.rest_connections, streams=1,
                     requests=1000, warmup=0.0, h1=True, headers=headers),
                probe=self.rest_probe("peer", peer_body, headers, "prefix"), by_count=True))
        if "sqlite" in groups and self.sqlite_sample is not None:
            raw = grpc_frame(pb.AuthenticateRequest(token=self.sqlite_sample.warm[0])
                             .SerializeToString())
            out.append(Phase("auth_sqlite", f"Authenticate, warm ({_n(base)} tokens), SQLite"
                             " store, same run", "ts_sqlite",
                             grpc_load("ts_sqlite", AUTHENTICATE, self.body("auth-sqlite", raw)),
                             AUTHENTICATE,
                             probe=self.grpc_probe("ts_sqlite", AUTHENTICATE, raw)))
        admin = (("authorization", f"Bearer {self.samples[base].admin}"),)
        if "list" in groups:
            for n in a.sizes:
                raw = grpc_frame(pb.ListTokensRequest().SerializeToString())
                s = f"ts_{n}"
                admin_n = (("authorization", f"Bearer {self.samples[n].admin}"),)
                out.append(Phase(f"list_{n}", f"ListTokens, first page ({_n(n)} tokens)", s,
                                 grpc_load(s, SERVICE + "ListTokens", self.body("list", raw),
                                           headers=(*GRPC_HEADERS, *admin_n)),
                                 SERVICE + "ListTokens",
                                 probe=self.grpc_probe(s, SERVICE + "ListTokens", raw, admin_n)))
        if "create" in groups:
            raw = grpc_frame(pb.CreateTokenRequest(name="bench", scopes=["pass:read"])
                             .SerializeToString())
            # Each call hashes a new secret with bcrypt: a few calls in flight fill the pool.
            out.append(Phase("create", "CreateToken (one bcrypt hash each)", ts,
                             grpc_load(ts, SERVICE + "CreateToken", self.body("create", raw),
                                       connections=1, streams=4,
                                       headers=(*GRPC_HEADERS, *admin)),
                             SERVICE + "CreateToken",
                             probe=self.grpc_probe(ts, SERVICE + "CreateToken", raw, admin)))
        if "cold" in groups:
            out.append(Phase("cold", "Authenticate, cold: one bcrypt check each (Python driver)",
                             ts, None, AUTHENTICATE))
        return out

    def prime(self, phases: list[Phase]) -> None:
        """Each warm token verified once per server process (one bcrypt each), paths warmed."""
        seen: set[tuple[str, Path]] = set()
        for phase in phases:
            if phase.load is None or (phase.load.url, phase.load.body) in seen:
                continue
            seen.add((phase.load.url, phase.load.body))
            server = self.servers[phase.server]
            # One call first: the one bcrypt check, and the request proved right.
            status = phase.probe() if phase.probe else "OK"
            if status != "OK":
                raise RuntimeError(f"priming {phase.name}: the probe answered {status}"
                                   f" ({server.tail()})")
            # A short burst on several connections: `--workers 2` spreads connections
            # over its processes, and each has its own verified-secret cache.
            load = Load(phase.load.url, phase.load.body, connections=8, streams=1,
                        requests=64 if phase.name != "create" else 8, h1=phase.load.h1,
                        headers=phase.load.headers)
            out = h2load.run(load, self.tmp, self.driver_cpus, tag=f"prime-{phase.name}")
            if out.error:
                raise RuntimeError(f"priming {phase.name}: {out.error}")
            if phase.by_count:
                out = h2load.run(phase.load, self.tmp, self.driver_cpus, tag=f"size-{phase.name}")
                if out.error or not out.rate:
                    raise RuntimeError(f"sizing {phase.name}: {out.error}")
                self.resize(phase, out.rate)
            status = phase.probe() if phase.probe else "OK"
            if status != "OK":
                raise RuntimeError(f"priming {phase.name}: the probe answered {status}"
                                   f" ({server.tail()})")

    def measure_or_crash(self, phase: Phase, round_: int) -> dict[str, Any]:
        """measure(), except that a server that died is recorded, not the end of the run.

        Its phases fail from then on (a crash is a finding, and the other
        servers' phases still say something); its log's tail is kept.
        """
        server = self.servers[phase.server]
        if server.proc.poll() is None:
            try:
                return self.measure(phase, round_)
            except (OSError, RuntimeError) as e:
                if server.proc.poll() is None:
                    raise
                error = repr(e)
        else:
            error = "the server had exited"
        code = server.proc.returncode
        if phase.server not in self.crashes:
            self.crashes[phase.server] = {"exit_code": code, "phase": phase.name,
                                          "round": round_,
                                          "log_tail": server.tail(6000, rpc_lines=False)}
            self.log(f"{phase.server} exited {code} during {phase.name}: its phases fail")
        return {"round": round_, "rate": 0.0, "p50_ms": 0.0, "p99_ms": 0.0, "verified": False,
                "error": f"{phase.server} exited {code}: {error}",
                "check": f"{phase.server} exited {code}"}

    def resize(self, phase: Phase, rate: float) -> None:
        """A by-count phase's calls: as many as `duration` seconds at the best rate seen yet.

        The best, not the last: a round in which a busy neighbour starved the
        server would otherwise make the next one too short to say anything.
        """
        assert phase.load is not None
        best = self.best_rate[phase.name] = max(rate, self.best_rate.get(phase.name, 0.0))
        calls = max(200, round(best * self.args.duration))
        phase.load = replace(phase.load, requests=calls)

    def measure(self, phase: Phase, round_: int) -> dict[str, Any]:
        self.check_time()
        server = self.servers[phase.server]
        before = phase.probe() if phase.probe else "OK"
        server.mark_log()
        flood_out: Outcome | None = None
        if phase.load is None:
            return self.measure_cold(phase, server)
        runs: list[tuple[Load, str]] = [(phase.load, phase.name)]
        if phase.flood is not None:
            runs.insert(0, (phase.flood, "flood"))
        running: list[h2load.Running] = []
        if phase.by_count:
            per0, t0 = server.cpu_by_process(), time.monotonic()
            db0 = self.db_cpu_seconds(phase.server)
        for load, tag in runs:
            if running:
                time.sleep(0.4)  # the flood first: its burst of failures spent, it is throttled
            running.append(h2load.Running(load, self.tmp, self.driver_cpus, tag))
        # The server's CPU over the measured window: from the end of the warm-up to the exit
        # (a by-count phase has no warm-up: from the start).
        # Redis works for the server that uses it: its CPU is priced beside the server's.
        redis_pid = self.redis.pid if self.redis is not None and phase.server == "lim_redis" \
            else None
        if not phase.by_count:
            time.sleep(phase.load.warmup + 0.05)
            per0, t0 = server.cpu_by_process(), time.monotonic()
            db0 = self.db_cpu_seconds(phase.server)
        redis0 = process_cpu_seconds(redis_pid) if redis_pid else 0.0
        outcomes = [r.finish() for r in running]
        per1, t1 = server.cpu_by_process(), time.monotonic()
        db1 = self.db_cpu_seconds(phase.server)
        redis1 = process_cpu_seconds(redis_pid) if redis_pid else 0.0
        cpu0, cpu1 = sum(per0.values()), sum(per1.values())
        calls = outcomes[-1].done if phase.by_count else outcomes[-1].rate * (t1 - t0)
        out = outcomes[-1]
        if phase.flood is not None:
            flood_out = outcomes[0]
        counts = server.rpc_counts().get(phase.method, {}) if phase.method else {}
        after = phase.probe() if phase.probe else "OK"
        result: dict[str, Any] = {
            "round": round_, **out.__dict__,
            "server_cpu_ms_per_call": round((cpu1 - cpu0) * 1000 / max(1, calls), 4),
            "server_busy": round((cpu1 - cpu0) / max(1e-3, t1 - t0), 3),
            "logged": counts, "probe_before": before, "probe_after": after,
        }
        if redis_pid:
            result["redis_cpu_ms_per_call"] = round((redis1 - redis0) * 1000 / max(1, calls), 4)
        if db0 is not None and db1 is not None:
            # PostgreSQL's processes run on the server's cores too: their CPU per call.
            result["db_cpu_ms_per_call"] = round((db1 - db0) * 1000 / max(1, calls), 4)
        if len(per1) > 1:
            # Where the CPU went: the first process (a supervisor, gunicorn's arbiter,
            # or the REST shim of `serve --workers`), then each child.
            result["process_busy"] = [round((per1[pid] - per0.get(pid, per1[pid]))
                                            / max(1e-3, t1 - t0), 3) for pid in per1]
        if flood_out is not None:
            result["flood"] = {k: v for k, v in flood_out.__dict__.items()
                               if k in ("rate", "done", "p50_ms", "p99_ms", "error")}
        result["verified"], result["check"] = verify(phase, out, counts, before, after)
        if phase.by_count and out.rate:
            self.resize(phase, out.rate)
        return result

    def measure_cold(self, phase: Phase, server: Server) -> dict[str, Any]:
        a = self.args
        tokens = self.samples[a.sizes[0]].cold
        per_round = len(tokens) // a.repeats
        mine, self.samples[a.sizes[0]].cold = tokens[:per_round], tokens[per_round:]
        if self.pool is None:
            self.pool = ProcessPoolExecutor(1, mp_context=get_context("spawn"),
                                            initializer=_pin, initargs=(self.driver_cpus,))
        from .loadgen import run_cold

        cpu0 = server.cpu_seconds()
        result = self.pool.submit(run_cold, server.grpc_port, mine, 4, a.duration).result(
            timeout=a.duration + 120)
        cpu1 = server.cpu_seconds()
        if "error" in result:
            raise RuntimeError(f"cold phase: {result['error']}")
        codes = result["codes"]
        result["server_cpu_ms_per_call"] = round((cpu1 - cpu0) * 1000 / max(1, result["done"]), 2)
        result["verified"] = set(codes) == {"OK"}
        result["check"] = ("every call's status read by the Python driver: "
                           + ", ".join(f"{k} {v}" for k, v in sorted(codes.items())))
        return result

    # The run.

    def main(self) -> dict[str, Any]:
        a = self.args
        load_before = os.getloadavg()
        urls = self.load_stores()
        self.start_servers(urls)
        # This process only waits from here on; it probes and reads logs on the driver's core.
        if self.driver_cpus:
            os.sched_setaffinity(0, self.driver_cpus)
        phases = self.phases()
        self.prime(phases)
        self.log(f"primed; {len(phases)} phases x {a.repeats} rounds of {a.duration:g} s")
        results: dict[str, list[dict[str, Any]]] = {p.name: [] for p in phases}
        profile = None
        for r in range(a.repeats):
            order = phases[r % len(phases):] + phases[: r % len(phases)]
            if r % 2:
                order.reverse()
            for phase in order:
                result = self.measure_or_crash(phase, r)
                if starved(result):
                    # A neighbour had the server's core: this says nothing about the
                    # server. Measured once more, in place; both are in the results.
                    self.log(f"{phase.name}: the server got {result['server_busy']:.2f} of a"
                             " core (starved by another process); once more")
                    first, result = result, self.measure_or_crash(phase, r)
                    result["starved_first"] = {k: first.get(k) for k in
                                               ("rate", "server_busy", "server_cpu_ms_per_call")}
                results[phase.name].append(result)
            self.log(f"round {r + 1}/{a.repeats}: " + ", ".join(
                f"{name} {rs[-1]['rate']:.0f}" for name, rs in results.items()))
        if a.profile:
            profile = self.profile(phases)
        for name, server in self.servers.items():
            self.rss[name] = server.peak_rss_mb()
        all_ratios = ratios(results, a.sizes)
        rss = rss_target(self.rss, a.sizes)
        if rss is not None:
            all_ratios.append(rss)
        return {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "label": a.label,
            "quick": a.quick,
            "command": "python -m bench " + " ".join(a.argv),
            "machine": machine(),
            "backend": a.backend,
            "driver": "h2load " + h2load_version(),
            "settings": {
                "sizes": a.sizes, "duration_s": a.duration, "warmup_s": a.warmup,
                "rounds": a.repeats, "bcrypt_rounds": a.rounds, "grpc_connections": a.connections,
                "grpc_streams": a.streams, "rest_connections": a.rest_connections,
                "driver_cores": sorted(self.driver_cpus or self.all_cpus),
                "server_cores": sorted(self.server_cpus or self.all_cpus),
                "flood_client": FLOOD_CLIENT,
            },
            "load_average": {"start": [round(x, 2) for x in load_before],
                             "end": [round(x, 2) for x in os.getloadavg()]},
            "load_seconds": {str(n): s for n, s in self.load_seconds.items()},
            "phases": {p.name: {"title": p.title, "server": p.server, "method": p.method,
                                "load": h2load.describe(p.load) if p.load else {"python": True},
                                "rounds": results[p.name], "median": medians(results[p.name])}
                       for p in phases},
            "ratios": all_ratios,
            "rss_mb": self.rss,
            "profile": profile,
            "crashes": self.crashes,
            "elapsed_s": round(time.monotonic() - self.started, 1),
        }

    def profile(self, phases: list[Phase]) -> dict[str, Any]:
        """py-spy on the server under warm Authenticate, then under REST, each for 2 phases' time.

        `serve --workers 2` under REST is profiled too when it ran: its REST shim
        is the supervisor process, the calls then go to the workers.
        """
        from .profile import record

        reports: dict[str, Any] = {}
        for phase in phases:
            if phase.name not in PROFILED or phase.load is None:
                continue
            server = self.servers[phase.server]
            if server.proc.poll() is not None:
                continue
            seconds = max(4.0, self.args.duration * 2)
            load = replace(phase.load, duration=seconds + 2, warmup=0.5, requests=0)
            for _ in range(2):  # py-spy now and then gets a handful of samples: once more
                running = h2load.Running(load, self.tmp, self.driver_cpus, "profile")
                time.sleep(1.0)
                report = record(server.pids(), seconds, self.tmp, top=60,
                                native=self.args.profile_native)
                out = running.finish()
                if report.get("samples", 0) >= 100:
                    break
            report["title"] = phase.title
            report["load"] = {"rate": out.rate, "error": out.error}
            reports[phase.name] = report
        return reports

    def close(self) -> None:
        for channel in self.channels.values():
            with contextlib.suppress(Exception):
                channel.close()
        for name, server in self.servers.items():
            with contextlib.suppress(Exception):
                code = server.stop()
                if code not in (0, -15):
                    self.log(f"{name} exited {code}: {server.tail()}")
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
        if self.cluster is not None:
            self.cluster.remove()
        if self.redis is not None:
            self.redis.remove()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _pin(cpus: set[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


def verify(phase: Phase, out: Outcome, counts: dict[str, int], before: str,
           after: str) -> tuple[bool, str]:
    """Did every call of the phase succeed? h2load alone cannot say for gRPC (always HTTP 200).

    Where the server logs a line per RPC, its log over the phase must show at
    least as many OK calls as h2load completed and nothing else but calls
    cancelled when h2load stopped (and, beside a flood, the flood's refusals);
    where it logs nothing (the bare server, log level WARNING), one call with
    the load's own bytes before and after the phase must answer OK. REST's
    HTTP statuses are h2load's own count.
    """
    notes = []
    ok = not out.error and out.failed == 0 and out.errored == 0 and out.timeout == 0
    if out.error:
        notes.append(out.error)
    ok = ok and before == "OK" and after == "OK"
    notes.append(f"probe before {before}, after {after}")
    if phase.load is not None and phase.load.h1:
        # Not 2xx == done: h2load counts a status and a completion on either side of
        # the window's edge now and then (one call, either way). Any other status shows.
        bad = sum(v for k, v in out.status.items() if k != "2xx")
        ok = ok and bad == 0 and out.status.get("2xx", 0) > 0
        notes.append("HTTP " + ", ".join(f"{k} {v}" for k, v in out.status.items() if v))
    if phase.method:
        logged_ok = counts.get("OK", 0)
        allowed = {"OK", "CANCELLED", *phase.expect_failures}
        others = {k: v for k, v in counts.items() if k not in allowed}
        ok = ok and logged_ok >= out.succeeded and not others
        notes.append("server log: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return ok, "; ".join(notes)


def starved(result: dict[str, Any]) -> bool:
    """Under half a core for a server driven with every call in flight: a neighbour took it.

    Every phase measured this way is CPU-bound when it has its core (its busy
    figure is 0.8 to 1.0 on one core, more with workers), so a figure under
    0.5 means the scheduler ran something else there.
    """
    busy = result.get("server_busy")
    return busy is not None and busy < 0.5


def medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("rate", "p50_ms", "p99_ms", "server_cpu_ms_per_call", "server_busy", "driver_busy",
            "redis_cpu_ms_per_call", "db_cpu_ms_per_call")
    out: dict[str, Any] = {}
    for key in keys:
        values = [r[key] for r in rounds if key in r]
        if values:
            out[key] = round(statistics.median(values), 4)
            out[key + "_min"], out[key + "_max"] = min(values), max(values)
    busy = [r["process_busy"] for r in rounds if "process_busy" in r]
    if busy and len({len(b) for b in busy}) == 1:
        out["process_busy"] = [round(statistics.median(col), 3) for col in zip(*busy,
                                                                                 strict=True)]
    out["verified"] = all(r.get("verified") for r in rounds)
    return out


def ratios(results: dict[str, list[dict[str, Any]]], sizes: list[int]) -> list[dict[str, Any]]:
    """Each ratio taken within a round (phases of one round ran back to back), then the median."""
    out = []

    def add(name: str, goal: str, test: Callable[[float], bool] | None,
            fn: Callable[[int], float], *needs: str) -> None:
        if not all(results.get(n) for n in needs):
            return
        per_round = [round(fn(r), 3) for r in range(len(results[needs[0]]))]
        median = round(statistics.median(per_round), 3)
        out.append({"ratio": name, "goal": goal, "median": median, "min": min(per_round),
                    "max": max(per_round), "per_round": per_round,
                    "holds": None if test is None else bool(test(median))})

    def rate(name: str, r: int) -> float:
        return results[name][r]["rate"]

    def p99(name: str, r: int) -> float:
        return results[name][r]["p99_ms"]

    def per_cpu(a: str, b: str, r: int) -> float:
        """Calls per server CPU-second of a ÷ of b: what a busy neighbour's share cannot move.

        NaN when a round read no CPU time for a (/proc unreadable for a moment)."""
        cost = results[a][r]["server_cpu_ms_per_call"]
        return results[b][r]["server_cpu_ms_per_call"] / cost if cost else math.nan

    add("health Check ÷ bare", "", None, lambda r: rate("health", r) / rate("bare", r),
        "health", "bare")
    add("warm Authenticate ÷ bare", "≥ 0.65", lambda v: v >= 0.65,
        lambda r: rate("auth", r) / rate("bare", r), "auth", "bare")
    add("warm Authenticate ÷ bare, calls per server CPU-second", "≥ 0.65", lambda v: v >= 0.65,
        lambda r: per_cpu("auth", "bare", r), "auth", "bare")
    add("warm Authenticate p99 ÷ bare p99", "≤ 2.0", lambda v: v <= 2.0,
        lambda r: p99("auth", r) / p99("bare", r), "auth", "bare")
    add("REST Authenticate ÷ gRPC Authenticate", "≥ 0.6", lambda v: v >= 0.6,
        lambda r: rate("rest", r) / rate("auth", r), "rest", "auth")
    add("REST Authenticate ÷ bare", "", None, lambda r: rate("rest", r) / rate("bare", r),
        "rest", "bare")
    add("REST Authenticate ÷ gRPC Authenticate, calls per server CPU-second", "≥ 0.6",
        lambda v: v >= 0.6, lambda r: per_cpu("rest", "auth", r), "rest", "auth")
    if len(sizes) > 1:
        big = sizes[-1]
        add(f"Authenticate at {_n(big)} ÷ at {_n(sizes[0])}", "≥ 0.9", lambda v: v >= 0.9,
            lambda r: rate(f"auth_{big}", r) / rate("auth", r), f"auth_{big}", "auth")
        add(f"Authenticate at {_n(big)} ÷ at {_n(sizes[0])}, calls per server CPU-second",
            "≥ 0.9", lambda v: v >= 0.9, lambda r: per_cpu(f"auth_{big}", "auth", r),
            f"auth_{big}", "auth")
        add(f"ListTokens at {_n(big)} ÷ at {_n(sizes[0])}", "≥ 0.9", lambda v: v >= 0.9,
            lambda r: rate(f"list_{big}", r) / rate(f"list_{sizes[0]}", r),
            f"list_{big}", f"list_{sizes[0]}")
    add("good client's calls/s lost to the flood", "< 0.20", lambda v: v < 0.20,
        lambda r: 1 - rate("flood", r) / rate("auth", r), "flood", "auth")
    add("the per-RPC log line's share of warm Authenticate (1 − logged ÷ unlogged)", "< 0.05",
        lambda v: v < 0.05, lambda r: 1 - rate("auth", r) / rate("nolog", r), "auth", "nolog")
    add("the per-RPC log line's share of warm Authenticate's server CPU", "< 0.05",
        lambda v: v < 0.05, lambda r: 1 - per_cpu("auth", "nolog", r), "auth", "nolog")
    add("metrics' share of warm Authenticate (1 − with ÷ without)", "< 0.05",
        lambda v: v < 0.05, lambda r: 1 - rate("auth", r) / rate("nometrics", r),
        "auth", "nometrics")
    add("metrics' share of warm Authenticate's server CPU", "< 0.05",
        lambda v: v < 0.05, lambda r: 1 - per_cpu("auth", "nometrics", r), "auth", "nometrics")
    add("Authenticate: --workers 2 ÷ --workers 1", "", None,
        lambda r: rate("w2_auth", r) / rate("w1_auth", r), "w2_auth", "w1_auth")
    add("REST Authenticate: --workers 2 ÷ --workers 1", "", None,
        lambda r: rate("w2_rest", r) / rate("w1_rest", r), "w2_rest", "w1_rest")
    # Rate limits: the same server with limits in process, or in Redis, against off.
    for name, where, goal in (("lim_local", "in process", 0.9), ("lim_redis", "in Redis", 0.6)):
        add(f"warm Authenticate, limits {where} ÷ limits off", f"≥ {goal}",
            lambda v, g=goal: v >= g, lambda r, n=name: rate(n, r) / rate("lim_off", r),
            name, "lim_off")
        add(f"warm Authenticate, limits {where} ÷ limits off, calls per server CPU-second", "",
            None, lambda r, n=name: per_cpu(n, "lim_off", r), name, "lim_off")
    for name, _ in LIMIT_SERVERS:
        add(f"{name} ÷ bare", "", None, lambda r, n=name: rate(n, r) / rate("bare", r),
            name, "bare")
    both = f"both on every core: serve --workers 2 ÷ {PEER} on gunicorn --workers {PEER_WORKERS}"
    add(f"REST Authenticate ÷ {PEER} ({both})", "≥ 1.5", lambda v: v >= 1.5,
        lambda r: rate("w2_rest", r) / rate("peer", r), "w2_rest", "peer")
    add(f"REST Authenticate ÷ {PEER}, calls per server CPU-second", "≥ 1.5",
        lambda v: v >= 1.5, lambda r: per_cpu("w2_rest", "peer", r), "w2_rest", "peer")
    add(f"gRPC Authenticate ÷ {PEER} ({both})", "≥ 3.0", lambda v: v >= 3.0,
        lambda r: rate("w2_auth", r) / rate("peer", r), "w2_auth", "peer")
    add(f"gRPC Authenticate ÷ {PEER}, calls per server CPU-second", "≥ 3.0",
        lambda v: v >= 3.0, lambda r: per_cpu("w2_auth", "peer", r), "w2_auth", "peer")
    add(f"REST Authenticate, serve --workers 1 ÷ {PEER} (tokenservice: one process)", "", None,
        lambda r: rate("w1_rest", r) / rate("peer", r), "w1_rest", "peer")
    add(f"gRPC Authenticate, serve --workers 1 ÷ {PEER} (tokenservice: one process)", "", None,
        lambda r: rate("w1_auth", r) / rate("peer", r), "w1_auth", "peer")
    add("PostgreSQL warm Authenticate ÷ SQLite's (same run, same size)", "≥ 0.7",
        lambda v: v >= 0.7, lambda r: rate("auth", r) / rate("auth_sqlite", r),
        "auth", "auth_sqlite")
    add("PostgreSQL warm Authenticate ÷ SQLite's, calls per server CPU-second", "≥ 0.7",
        lambda v: v >= 0.7, lambda r: per_cpu("auth", "auth_sqlite", r), "auth", "auth_sqlite")
    if results.get("auth") and "db_cpu_ms_per_call" in results["auth"][0]:
        add("PostgreSQL warm Authenticate ÷ SQLite's, calls per CPU-second of the server and"
            " PostgreSQL together", "≥ 0.7", lambda v: v >= 0.7,
            lambda r: results["auth_sqlite"][r]["server_cpu_ms_per_call"]
            / (results["auth"][r]["server_cpu_ms_per_call"]
               + results["auth"][r]["db_cpu_ms_per_call"]), "auth", "auth_sqlite")
    return out


def rss_target(rss: dict[str, dict[str, float]], sizes: list[int]) -> dict[str, Any] | None:
    """Peak RSS of the one-process server on the largest store: goal under 150 MB."""
    big = rss.get(f"ts_{sizes[-1]}")
    if big is None:
        return None
    mb = big["sum"]
    return {"ratio": f"peak RSS at {_n(sizes[-1])} tokens, MB (one process)", "goal": "< 150",
            "median": mb, "min": mb, "max": mb, "per_round": [mb], "holds": mb < 150}


def h2load_version() -> str:
    import subprocess

    done = subprocess.run([h2load.H2LOAD, "--version"], capture_output=True, text=True)
    return done.stdout.strip().rsplit("/", 1)[-1]


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":")[1].strip()
    return {"cpu": model, "cores": os.cpu_count(), "memory": mem,
            "python": platform.python_version(), "kernel": platform.release()}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--sizes", type=lambda s: [int(float(x)) for x in s.split(",")],
                   default=None, help="store sizes, smallest first (default 1k,100k,1M)")
    p.add_argument("--duration", type=float, default=None,
                   help="measured seconds per phase (default 5; --quick 2)")
    p.add_argument("--warmup", type=float, default=None, help="h2load warm-up seconds")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    p.add_argument("--connections", type=int, default=4, help="h2load -c for gRPC")
    p.add_argument("--streams", type=int, default=16, help="h2load -m for gRPC")
    p.add_argument("--rest-connections", type=int, default=16, help="h2load --h1 -c")
    p.add_argument("--rounds", type=int, default=None,
                   help="bcrypt rounds (default 12, --quick 10: warm phases never run bcrypt)")
    p.add_argument("--quick", action="store_true",
                   help="1k and 100k tokens, 2 s phases, no cold/list/create: under 3 minutes")
    p.add_argument("--phases", type=lambda s: s.split(","), default=None, dest="groups",
                   help="a subset of: " + ",".join(GROUPS))
    p.add_argument("--profile", action="store_true",
                   help="also py-spy the server under warm Authenticate and REST Authenticate")
    p.add_argument("--profile-native", action="store_true",
                   help="with --profile: C frames too (py-spy --native), e.g. grpc's Cython core")
    p.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    p.add_argument("--label", default="", help="a name for this run in the results")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: a new file)")
    p.add_argument("--max-minutes", type=float, default=30.0)
    p.add_argument("--update-doc", action="store_true",
                   help="write this run's section into BENCHMARKS.md (nothing tracked otherwise)")
    args = p.parse_args(argv)
    args.argv = argv
    default = [g for g in (QUICK_GROUPS if args.quick else GROUPS)
               if BACKEND_ONLY.get(g, args.backend) == args.backend]
    if args.quick:
        # Hashing the store's secrets is most of a quick run's set-up; only the cold
        # and create phases (not in --quick) run bcrypt while measuring.
        args.rounds = args.rounds or 10
        args.sizes = args.sizes or [1_000, 100_000]
        args.duration = args.duration or 2.0
        args.warmup = args.warmup if args.warmup is not None else 0.5
    args.sizes = sorted(args.sizes or [1_000, 100_000, 1_000_000])
    args.rounds = args.rounds or 12
    args.duration = args.duration or 5.0
    args.warmup = args.warmup if args.warmup is not None else 1.0
    args.groups = args.groups or default
    unknown = set(args.groups) - set(GROUPS)
    if unknown:
        p.error(f"unknown phases: {', '.join(sorted(unknown))}")
    if "bare" not in args.groups:
        args.groups = ["bare", *args.groups]  # every figure is read against the ceiling
    return args


def peer_missing() -> str | None:
    """None when the peer can be served here, else what to install."""
    import importlib.util

    from .servers import GUNICORN

    if importlib.util.find_spec("rest_framework_api_key") is None or not Path(GUNICORN).exists():
        return ("the peer (djangorestframework-api-key on gunicorn) is not installed:"
                " pip install -e '.[bench]', or leave it out with --phases")
    return None


def output_path(args: argparse.Namespace) -> Path:
    if args.out:
        return args.out
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%S")
    parts = [stamp, args.backend, "h2load"] + (["quick"] if args.quick else []) + \
        ([args.label] if args.label else [])
    return RESULTS / ("-".join(parts) + ".json")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    missing = h2load.available() or (peer_missing() if "peer" in args.groups else None)
    if missing:
        print(f"bench: {missing}", file=sys.stderr)
        return 2
    out = output_path(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        print(f"bench: {out} exists; results never overwrite a file", file=sys.stderr)
        return 2
    bench = Bench(args)
    try:
        results = bench.main()
    finally:
        bench.close()
    with open(out, "x") as f:
        f.write(json.dumps(results, indent=1) + "\n")
    print(f"results: {out}", file=sys.stderr)
    from .report import summary, update

    print(summary(results))
    if args.update_doc:
        update(out)
    return 0 if all(p["median"]["verified"] for p in results["phases"].values()) else 1
