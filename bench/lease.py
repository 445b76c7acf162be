"""`python -m bench.lease`: what the consumer's lease-kept cache buys, and what it costs the server.

Three measurements, in one run:

1. the example consumer (examples/consumer, `--aio` and sync) under h2load,
   WhoAmI with a valid token: calls/s and latency without the cache and with
   it (`--lease-cache-token`), rounds interleaved, ratio within each round;
2. the admission a consumer adds per request with the cache, measured in
   process: AuthInterceptor.authenticate() on a cached token (p50, p99), beside
   the same call without a cache (an Authenticate round trip);
3. RevokeToken's latency (p50, p99) with 0, 10 and 1000 consumers watching
   (AsyncLeaseCache streams from one asyncio process over a few channels),
   and the server's CPU while 1000 consumers only renew their leases.

Pinning (two cores or more): the consumer on the first core; tokenservice,
h2load and the watchers on the others. Results go to bench/results/ as JSON
and are printed as Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import h2load
from .bare import PATH as BARE_PATH
from .h2load import GRPC_HEADERS, Load, grpc_frame
from .servers import HOST, TOKENSERVICE, start_bare, start_tokenservice, taskset, wait_ready

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "consumer"
WHOAMI = "/example.passes.v1.PassService/WhoAmI"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cli(url: str, *args: str) -> str:
    env = {**os.environ, "TOKENSERVICE_BCRYPT_ROUNDS": "4"}
    done = subprocess.run([TOKENSERVICE, *args, "--database-url", url], capture_output=True,
                          text=True, env=env, check=True, stdin=subprocess.DEVNULL)
    return done.stdout.strip().splitlines()[-1]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Consumer:
    """examples/consumer/server.py in a process of its own."""

    def __init__(self, name: str, target: str, cpus: set[int] | None, aio: bool,
                 lease_token: str | None) -> None:
        self.name = name
        command = [*taskset(cpus), sys.executable, str(EXAMPLE / "server.py"),
                   "--tokenservice", target, "--port", "0"]
        if aio:
            command.append("--aio")
        if lease_token:
            command += ["--lease-cache-token", lease_token]
        env = {**os.environ, "GRPC_VERBOSITY": "NONE"}
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"listening on (\S+)$", line.strip())
        if match is None:
            raise RuntimeError(f"{name} did not start: {line}")
        self.target = match.group(1)

    def probe(self, token: str) -> str:
        """One WhoAmI with the load's token: its status name."""
        import grpc

        with grpc.insecure_channel(self.target) as channel:
            call = channel.unary_unary(WHOAMI)
            try:
                call(b"", metadata=(("authorization", f"Bearer {token}"),), timeout=10)
                return "OK"
            except grpc.RpcError as err:
                return err.code().name

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def throughput(args: argparse.Namespace, workdir: Path, target: str, token: str, verify: str,
               consumer_cpus: set[int] | None, driver_cpus: set[int] | None) -> dict[str, Any]:
    body = workdir / "whoami.bin"
    body.write_bytes(grpc_frame(b""))
    kinds = [("aio", True), ("sync", False)]
    consumers = {}
    for kind, aio in kinds:
        for cached in (False, True):
            name = f"{kind}-{'cache' if cached else 'nocache'}"
            consumers[name] = Consumer(name, target, consumer_cpus, aio, verify if cached else None)
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in consumers}
    # The ceiling, on the consumer's core and under the same load in every round: a
    # bare grpc.aio server with an empty method (h2load's headroom shows against it).
    bare = start_bare(workdir, consumer_cpus)
    rounds["bare"] = []
    try:
        wait_ready([bare])
        for name, consumer in consumers.items():  # warm: the lease, the cache, the channels
            assert consumer.probe(token) == "OK", f"{name} refused the token"
        for r in range(args.repeats):
            out = h2load.run(Load(f"http://{HOST}:{bare.grpc_port}{BARE_PATH}", body,
                                  args.connections, args.streams, duration=args.duration,
                                  warmup=1.0, headers=GRPC_HEADERS), workdir, driver_cpus, "bare")
            rounds["bare"].append({"rate": out.rate, "p50_ms": out.p50_ms, "p99_ms": out.p99_ms,
                                   "ok": not out.error and out.failed == 0,
                                   "driver_busy": out.driver_busy})
            log(f"round {r + 1} bare: {out.rate:.0f}/s p50 {out.p50_ms} ms")
            order = list(consumers.items())
            order = order[r % len(order):] + order[:r % len(order)]
            for name, consumer in order:
                host, port = consumer.target.rsplit(":", 1)
                load = Load(f"http://{host}:{port}{WHOAMI}", body, args.connections,
                            args.streams, duration=args.duration, warmup=1.0,
                            headers=(*GRPC_HEADERS, ("authorization", f"Bearer {token}")))
                before = consumer.probe(token)
                out = h2load.run(load, workdir, driver_cpus, name)
                after = consumer.probe(token)
                ok = before == after == "OK" and not out.error and out.failed == 0
                rounds[name].append({"rate": out.rate, "p50_ms": out.p50_ms,
                                     "p99_ms": out.p99_ms, "ok": ok,
                                     "driver_busy": out.driver_busy})
                log(f"round {r + 1} {name}: {out.rate:.0f}/s p50 {out.p50_ms} ms"
                    f"{'' if ok else ' NOT OK: ' + (out.error or before + '/' + after)}")
    finally:
        for consumer in consumers.values():
            consumer.stop()
        bare.stop()
    result: dict[str, Any] = {}
    for name, runs in rounds.items():
        result[name] = {k: statistics.median(r[k] for r in runs)
                        for k in ("rate", "p50_ms", "p99_ms", "driver_busy")}
        result[name]["ok"] = all(r["ok"] for r in runs)
    for kind, _ in kinds:
        ratios = [c["rate"] / n["rate"] for c, n in zip(rounds[f"{kind}-cache"],
                                                         rounds[f"{kind}-nocache"], strict=True)]
        result[f"{kind}-ratio"] = {"median": statistics.median(ratios),
                                   "min": min(ratios), "max": max(ratios)}
        ceiling = [c["rate"] / b["rate"] for c, b in zip(rounds[f"{kind}-cache"],
                                                          rounds["bare"], strict=True)]
        result[f"{kind}-cache-of-bare"] = {"median": statistics.median(ceiling),
                                           "min": min(ceiling), "max": max(ceiling)}
    return result


def admission(target: str, token: str, verify: str, calls: int) -> dict[str, Any]:
    """AuthInterceptor.authenticate() per call, cached and not, in this process."""
    sys.path.insert(0, str(EXAMPLE))
    from server import SCOPES  # type: ignore[import-not-found]

    from tokenservice_client import AuthInterceptor, LeaseCache

    class Context:
        def time_remaining(self) -> None:
            return None

        def peer(self) -> str:
            return "ipv4:127.0.0.1:1"

    metadata = (("authorization", f"Bearer {token}"),)
    out: dict[str, Any] = {}
    cache = LeaseCache(target, verify)
    try:
        assert cache.wait_leased(10)
        for name, interceptor, n in (
            ("cache", AuthInterceptor(target, SCOPES, cache=cache), calls),
            ("nocache", AuthInterceptor(target, SCOPES), max(200, calls // 100)),
        ):
            interceptor.authenticate(metadata, Context())
            times = []
            clock = time.perf_counter_ns
            for _ in range(n):
                start = clock()
                interceptor.authenticate(metadata, Context())
                times.append((clock() - start) / 1000)
            out[name] = {"calls": n, "p50_us": round(pct(times, 0.5), 2),
                         "p99_us": round(pct(times, 0.99), 2)}
        out["cache"]["hits"] = cache.stats().hits
    finally:
        cache.close()
    return out


WATCHERS_SCRIPT = """
import asyncio, sys
from tokenservice_client import AsyncLeaseCache, AsyncTokenServiceClient

async def main(target, token, n, channels):
    clients = [AsyncTokenServiceClient(target, token) for _ in range(channels)]
    caches = [AsyncLeaseCache(clients[i % channels]) for i in range(n)]
    while sum(c.leased for c in caches) < n:
        await asyncio.sleep(0.05)
    print("leased", n, flush=True)
    while True:
        await asyncio.sleep(1)
        print("leased", sum(c.leased for c in caches), "invalidations",
              sum(c.stats().invalidations for c in caches), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
"""


def revokes(args: argparse.Namespace, server: Any, url: str, manage: str, verify: str,
            cpus: set[int] | None) -> dict[str, Any]:
    from tokenservice_client import TokenServiceClient

    target = f"{HOST}:{server.grpc_port}"
    client = TokenServiceClient(target, manage)
    results: dict[str, Any] = {}
    try:
        for watchers in args.watchers:
            proc = None
            if watchers:
                channels = max(1, min(10, watchers // 100))
                proc = subprocess.Popen(
                    [*taskset(cpus), sys.executable, "-c", WATCHERS_SCRIPT, target, verify,
                     str(watchers), str(channels)],
                    stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                    env={**os.environ, "GRPC_VERBOSITY": "NONE"})
                assert proc.stdout is not None
                line = proc.stdout.readline()
                assert line.startswith("leased"), line
            tokens = [client.create_token(f"r{watchers}-{i}", ["pass:read"]).api_token.id
                      for i in range(args.revokes)]
            idle = {}
            if watchers:
                # The server's cost of consumers that only renew their leases.
                before, t0 = cpu_seconds(server.proc.pid), time.monotonic()
                time.sleep(args.idle_seconds)
                idle = {"server_core_busy": round(
                    (cpu_seconds(server.proc.pid) - before) / (time.monotonic() - t0), 3)}
            times = []
            server_cpu = cpu_seconds(server.proc.pid)
            watchers_cpu = cpu_seconds(proc.pid) if proc is not None else 0.0
            began = time.monotonic()
            for token_id in tokens:
                start = time.perf_counter()
                client.revoke_token(token_id, timeout=30)
                times.append((time.perf_counter() - start) * 1000)
            wall = time.monotonic() - began
            during = {
                "server_cpu_ms_per_revoke": round(
                    (cpu_seconds(server.proc.pid) - server_cpu) * 1000 / len(times), 2),
                "server_core_busy_revoking": round(
                    (cpu_seconds(server.proc.pid) - server_cpu) / wall, 3),
            }
            if proc is not None:
                # The measurer: one Python process playing every consumer.
                during["watchers_core_busy_revoking"] = round(
                    (cpu_seconds(proc.pid) - watchers_cpu) / wall, 3)
            results[str(watchers)] = {"revokes": len(times), "p50_ms": round(pct(times, 0.5), 2),
                                      "p99_ms": round(pct(times, 0.99), 2), **idle, **during}
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
            log(f"{watchers} watchers: RevokeToken p50 {results[str(watchers)]['p50_ms']} ms,"
                f" p99 {results[str(watchers)]['p99_ms']} ms {idle}")
    finally:
        client.close()
    return results


def markdown(result: dict[str, Any]) -> str:
    t = result["throughput"]
    lines = ["| example consumer, WhoAmI | calls/s | p50 ms | p99 ms | h2load core busy |"
             " every call OK? |", "|---|---|---|---|---|---|"]
    for name in ("bare", "aio-nocache", "aio-cache", "sync-nocache", "sync-cache"):
        r = t[name]
        label = "bare grpc.aio server (the ceiling)" if name == "bare" else name
        lines.append(f"| {label} | {r['rate']:.0f} | {r['p50_ms']} | {r['p99_ms']} |"
                     f" {r['driver_busy']} | {'yes' if r['ok'] else '**no**'} |")
    lines += ["", "| ratio within each round | median | range |", "|---|---|---|"]
    for kind in ("aio", "sync"):
        for key, what in ((f"{kind}-ratio", "with the cache ÷ without"),
                          (f"{kind}-cache-of-bare", "with the cache ÷ bare")):
            r = t[key]
            lines.append(f"| {kind}: {what} | {r['median']:.2f} |"
                         f" {r['min']:.2f}–{r['max']:.2f} |")
    a = result["admission"]
    lines += ["", "| AuthInterceptor.authenticate(), in process | calls | p50 µs | p99 µs |",
              "|---|---|---|---|",
              f"| cached (LeaseCache) | {a['cache']['calls']} | {a['cache']['p50_us']} |"
              f" {a['cache']['p99_us']} |",
              f"| no cache (an Authenticate round trip) | {a['nocache']['calls']} |"
              f" {a['nocache']['p50_us']} | {a['nocache']['p99_us']} |"]
    lines += ["", "| watching consumers | RevokeToken p50 ms | p99 ms | server CPU ms per"
              " revoke | server core busy while they only renew | watchers' core busy"
              " while revoking |", "|---|---|---|---|---|---|"]
    for n, r in result["revoke"].items():
        lines.append(f"| {n} | {r['p50_ms']} | {r['p99_ms']} | {r['server_cpu_ms_per_revoke']} |"
                     f" {r.get('server_core_busy', '')} |"
                     f" {r.get('watchers_core_busy_revoking', '')} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.lease", description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=5.0, help="h2load seconds per run")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--admission-calls", type=int, default=100_000)
    p.add_argument("--watchers", type=lambda s: [int(x) for x in s.split(",")],
                   default=[0, 10, 1000])
    p.add_argument("--revokes", type=int, default=100)
    p.add_argument("--idle-seconds", type=float, default=10.0)
    p.add_argument("--quick", action="store_true", help="short runs, for a smoke test")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.repeats, args.admission_calls = 2.0, 1, 20_000
        args.revokes, args.idle_seconds = 30, 3.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = h2load.available()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    cores = sorted(os.sched_getaffinity(0))
    consumer_cpus = {cores[0]} if len(cores) >= 2 else None
    other_cpus = set(cores[1:]) if len(cores) >= 2 else None
    with tempfile.TemporaryDirectory(prefix="tokenservice-lease-bench-") as tmp:
        workdir = Path(tmp)
        url = f"sqlite:///{workdir / 'tokens.db'}"
        cli(url, "migrate")
        subprocess.run([TOKENSERVICE, "user", "add", "--email", "bench@acme.test", "--org",
                        "acme", "--permissions", "api_token:manage,api_token:verify,pass:read",
                        "--database-url", url], check=True, capture_output=True)
        mint = lambda scopes: cli(url, "token", "create", "--email", "bench@acme.test",  # noqa: E731
                                  "--name", "bench", "--scopes", scopes)
        manage, verify, token = mint("api_token:manage,pass:read"), mint("api_token:verify"), mint(
            "pass:read")
        server = start_tokenservice("tokenservice", url, workdir, other_cpus, rounds=4,
                                    log_level="WARNING", rest=False)
        try:
            wait_ready([server])
            target = f"{HOST}:{server.grpc_port}"
            log("throughput: the example consumer with and without the cache")
            result: dict[str, Any] = {
                "when": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": {"cores": len(cores), "python": sys.version.split()[0],
                            # Other work on the machine shows here: read figures with it.
                            "load_average_at_start": os.getloadavg()},
                "settings": {k: v for k, v in vars(args).items() if k != "out"},
            }
            result["throughput"] = throughput(args, workdir, target, token, verify,
                                              consumer_cpus, other_cpus)
            log("admission: AuthInterceptor.authenticate() per call")
            result["admission"] = admission(target, token, verify, args.admission_calls)
            log("RevokeToken with watching consumers")
            # The watchers on the consumer's core: the server keeps a core of its own.
            result["revoke"] = revokes(args, server, url, manage, verify, consumer_cpus)
        finally:
            server.stop()
    result["machine"]["load_average_at_end"] = os.getloadavg()
    out = args.out or ROOT / "bench" / "results" / (
        datetime.now(UTC).strftime("%Y-%m-%dT%H%M%S") + "-lease.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
