"""`python -m bench`: load N tokens, serve them with `tokenservice serve`, measure each phase.

For each store size the server is a fresh `tokenservice serve` process (so
its peak RSS belongs to that size); the phases run from separate driver
processes, each repeated, in a rotating order so the machine's drift falls on
all of them alike. Everything is bounded: each phase by its duration, each
call by a deadline, the whole run by --max-minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .dataset import PREFIX, Dataset, Sample
from .loadgen import Phase, driver_main

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TOKENSERVICE = str(Path(sys.executable).with_name("tokenservice"))
PHASES = ("health", "auth_warm", "auth_cold", "auth_invalid", "list", "list_filtered", "audit",
          "create", "rest_auth", "flood")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def invalid_tokens(n: int, rng: random.Random) -> list[str]:
    """Half with a bad checksum (refused before the database), half well-formed but unknown."""
    from tokenservice_server import tokens

    out = []
    for i in range(n):
        body = PREFIX + "".join(rng.choices(tokens.ALPHABET, k=tokens.LOOKUP_LEN +
                                            tokens.SECRET_LEN))
        check = tokens.checksum(body)
        if i % 2 == 0:
            check = check[::-1] if check[::-1] != check else "000000"
        out.append(body + check)
    return out


class Deadline(Exception):
    pass


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.tmp = Path(tempfile.mkdtemp(prefix="tokenservice-bench-"))
        self.rng = random.Random(66)
        self.cluster: Any = None
        self.server: subprocess.Popen[bytes] | None = None
        ctx = multiprocessing.get_context("spawn")
        self.drivers = []
        for _ in range(2):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=driver_main, args=(child,), daemon=True)
            proc.start()
            self.drivers.append((proc, parent))

    def check_time(self) -> None:
        if time.monotonic() - self.started > self.args.max_minutes * 60:
            raise Deadline(f"the run passed --max-minutes {self.args.max_minutes}")

    def log(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed:7.1f}s] {message}", file=sys.stderr, flush=True)

    # The database.

    def database_url(self) -> str:
        if self.args.backend == "sqlite":
            return f"sqlite:///{self.tmp / 'bench.db'}"
        sys.path.insert(0, str(ROOT / "tests"))
        from pgcluster import PgCluster  # the tests' throwaway cluster, reused as is

        self.cluster = PgCluster().start()
        return self.cluster.create_database("bench")

    # The server.

    def start_server(self, url: str) -> tuple[int, int]:
        grpc_port, http_port = free_port(), free_port()
        command = [
            TOKENSERVICE, "serve", "--host", "127.0.0.1", "--database-url", url,
            "--grpc-port", str(grpc_port), "--http-port", str(http_port),
            "--bcrypt-rounds", str(self.args.rounds),
        ]
        if self.args.workers:
            command += ["--workers", str(self.args.workers)]
        env = {**os.environ, "GRPC_VERBOSITY": "NONE"}
        self.server_log = open(self.tmp / "server.log", "ab")  # noqa: SIM115
        self.server = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                       stderr=self.server_log, env=env, cwd=self.tmp)
        self.wait_ready(grpc_port, http_port)
        return grpc_port, http_port

    def wait_ready(self, grpc_port: int, http_port: int) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + 60
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                assert self.server is not None
                if self.server.poll() is not None:
                    raise RuntimeError(f"tokenservice serve exited: {self.tail_log()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        with socket.create_connection(("127.0.0.1", http_port), timeout=1):
                            return
                except (grpc.RpcError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"tokenservice serve never became ready: {self.tail_log()}")
                time.sleep(0.2)

    def tail_log(self) -> str:
        try:
            return (self.tmp / "server.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def server_pids(self) -> list[int]:
        assert self.server is not None
        pids = [self.server.pid]
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{self.server.pid}/task").iterdir():
                pids += [int(p) for p in (task / "children").read_text().split()]
        return pids

    def peak_rss_mb(self) -> dict[str, float]:
        """VmHWM (peak resident set) of the server and its worker processes, in MB."""
        peaks = []
        for pid in self.server_pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peaks.append(int(line.split()[1]) / 1024)
        return {"max_process": round(max(peaks, default=0), 1),
                "sum": round(sum(peaks), 1), "processes": len(peaks)}

    def stop_server(self) -> int | None:
        if self.server is None:
            return None
        self.server.send_signal(signal.SIGTERM)
        try:
            code = self.server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.server.kill()
            code = self.server.wait()
        self.server = None
        self.server_log.close()
        return code

    # The load.

    def run(self, *phases: Phase) -> list[dict[str, Any]]:
        """Runs phases at once, one per driver process; returns their results."""
        self.check_time()
        for (_, conn), phase in zip(self.drivers, phases, strict=False):
            conn.send(phase.__dict__)
        limit = max(p.warmup + p.duration for p in phases) + 30 + 15
        results = []
        for (_, conn), _phase in zip(self.drivers, phases, strict=False):
            if not conn.poll(limit):
                raise RuntimeError("a driver did not answer in time")
            result = conn.recv()
            if result["error"]:
                raise RuntimeError(f"driver failed: {result['error']}")
            results.append(result)
        return results

    def measure_size(self, n: int, sample: Sample, invalid: list[str]) -> dict[str, Any]:
        a = self.args
        grpc_port, http_port = self.start_server(self.url)
        self.log(f"serving {n} tokens: grpc {grpc_port}, http {http_port}")

        def phase(kind: str, tokens: list[str], **kw: Any) -> Phase:
            kw.setdefault("concurrency", a.concurrency)
            kw.setdefault("duration", a.duration)
            return Phase(kind=kind, grpc_port=grpc_port, http_port=http_port, tokens=tokens,
                         bearer=sample.admin, **kw)

        # Prime: every warm token verified once (one bcrypt each), then a short spin.
        self.run(phase("auth", sample.warm, unique=True, warmup=0, duration=120,
                       concurrency=4))
        self.run(phase("list", [], warmup=0, duration=0.5))
        cold = list(sample.cold)
        cold_per_phase = len(cold) // a.repeats
        per: dict[str, list[dict[str, Any]]] = {p: [] for p in PHASES}
        per["flood_invalid"] = []
        chosen = tuple(p for p in PHASES if p in a.phases)
        for r in range(a.repeats):
            order = chosen[r % len(chosen):] + chosen[: r % len(chosen)]
            if r % 2:
                order = tuple(reversed(order))
            for name in order:
                if name == "health":
                    per[name] += self.run(phase("health", []))
                elif name == "auth_warm":
                    per[name] += self.run(phase("auth", sample.warm))
                elif name == "auth_cold":
                    mine = cold[r * cold_per_phase:(r + 1) * cold_per_phase]
                    per[name] += self.run(phase("auth", mine, unique=True, concurrency=4))
                elif name == "auth_invalid":
                    per[name] += self.run(phase("auth", invalid))
                elif name in ("list", "list_filtered", "audit"):
                    per[name] += self.run(phase(name, []))
                elif name == "create":
                    per[name] += self.run(phase("create", [], concurrency=4))
                elif name == "rest_auth":
                    per[name] += self.run(phase("rest_auth", sample.warm))
                elif name == "flood":
                    at = time.time() + 0.3
                    good, bad = self.run(phase("auth", sample.warm, start_at=at),
                                         phase("auth", invalid, start_at=at))
                    per["flood"].append(good)
                    per["flood_invalid"].append(bad)
            self.log(f"{n} tokens: repeat {r + 1}/{a.repeats} done")
        profile = None
        if a.profile and n == max(self.sizes):
            profile = self.profile(grpc_port, http_port, sample)
        rss = self.peak_rss_mb()
        code = self.stop_server()
        summary = {name: summarise(results) for name, results in per.items() if results}
        return {"tokens": n, "rss_mb": rss, "server_exit": code, "summary": summary,
                "runs": per, "profile": profile}

    def profile(self, grpc_port: int, http_port: int, sample: Sample) -> dict[str, Any]:
        from .profile import record

        assert self.server is not None
        seconds = max(5.0, self.args.duration * 2)
        load = Phase(kind="auth", grpc_port=grpc_port, http_port=http_port,
                     tokens=sample.warm, concurrency=self.args.concurrency,
                     duration=seconds + 1.0)
        (_, conn) = self.drivers[0]
        conn.send(load.__dict__)
        time.sleep(load.warmup + 0.5)
        report = record(self.server_pids(), seconds, self.tmp)
        conn.poll(seconds + 60)
        conn.recv()
        return report

    def main(self) -> dict[str, Any]:
        a = self.args
        self.sizes = sorted(a.sizes)
        self.url = self.database_url()
        dataset = Dataset(self.url, a.rounds)
        self.log(f"hashing {len(dataset.secrets)} distinct secrets at {a.rounds} rounds")
        dataset.setup()
        invalid = invalid_tokens(2000, self.rng)
        sizes = []
        for n in self.sizes:
            seconds = dataset.grow(n)
            self.log(f"loaded {n} tokens ({seconds:.1f} s for this step)")
            cold_needed = max(60, int(a.duration * 8 * a.repeats * 1.5))
            sample = dataset.sample(min(a.warm_tokens, n // 2), cold_needed)
            result = self.measure_size(n, sample, invalid)
            result["load_seconds"] = round(seconds, 1)
            sizes.append(result)
            self.log(f"{n}: " + ", ".join(
                f"{k} {v['rate']:.0f}/s p99 {v['p99_ms']:.1f}ms"
                for k, v in result["summary"].items()))
        dataset.close()
        return {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "label": a.label,
            "command": "python -m bench " + " ".join(sys.argv[1:]),
            "machine": machine(),
            "backend": a.backend,
            "settings": {"concurrency": a.concurrency, "duration_s": a.duration,
                         "repeats": a.repeats, "bcrypt_rounds": a.rounds,
                         "server_workers": a.workers or 1, "warm_tokens": a.warm_tokens,
                         "cold_concurrency": 4, "create_concurrency": 4},
            "sizes": sizes,
            "targets": targets(sizes) if set(a.phases) >= set(PHASES) else [],
            "elapsed_s": round(time.monotonic() - self.started, 1),
        }

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop_server()
        for proc, conn in self.drivers:
            with contextlib.suppress(Exception):
                conn.send(None)
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
        if self.cluster is not None:
            self.cluster.remove()
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over the repeats: a drifting machine moves every phase alike."""
    codes: dict[str, int] = {}
    for r in results:
        for code, count in r["codes"].items():
            codes[code] = codes.get(code, 0) + count
    return {
        "rate": round(statistics.median(r["rate"] for r in results), 1),
        "p50_ms": round(statistics.median(r["p50_ms"] for r in results), 3),
        "p99_ms": round(statistics.median(r["p99_ms"] for r in results), 3),
        "codes": codes,
    }


def targets(sizes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 6 §4: each a ratio measured in this one run; per-size ones at their worst size."""
    out = []

    def add(name: str, value: float, goal: str, holds: bool, where: str) -> None:
        out.append({"target": name, "measured": round(value, 3), "goal": goal,
                    "holds": bool(holds), "where": where})

    def worst(fn: Any, lower_is_worse: bool = True) -> tuple[float, int]:
        values = [(fn(s["summary"]), s["tokens"]) for s in sizes]
        return min(values) if lower_is_worse else max(values)

    v, n = worst(lambda s: s["auth_warm"]["rate"] / s["health"]["rate"])
    add("warm Authenticate calls/s ÷ empty RPC calls/s", v, "≥ 0.70", v >= 0.70, f"{n} tokens")
    v, n = worst(lambda s: s["auth_warm"]["p99_ms"] / s["health"]["p99_ms"], False)
    add("warm Authenticate p99 ÷ empty RPC p99", v, "≤ 2.0", v <= 2.0, f"{n} tokens")
    small, big = sizes[0], sizes[-1]
    v = big["summary"]["auth_warm"]["rate"] / small["summary"]["auth_warm"]["rate"]
    add(f"Authenticate calls/s at {big['tokens']} ÷ at {small['tokens']}", v, "≥ 0.90",
        v >= 0.90, "")
    v = big["summary"]["list"]["rate"] / small["summary"]["list"]["rate"]
    add(f"ListTokens first page calls/s at {big['tokens']} ÷ at {small['tokens']}", v,
        "≥ 0.90 (within 10 %)", v >= 0.90, "")
    v, n = worst(lambda s: 1 - s["flood"]["rate"] / s["auth_warm"]["rate"], False)
    add("good client's throughput lost to an invalid-token flood", v, "< 0.20", v < 0.20,
        f"{n} tokens")
    v, n = worst(lambda s: s["rest_auth"]["rate"] / s["auth_warm"]["rate"])
    add("REST Authenticate calls/s ÷ gRPC Authenticate calls/s", v, "≥ 0.50", v >= 0.50,
        f"{n} tokens")
    rss = big["rss_mb"]["sum"]
    add(f"server peak RSS at {big['tokens']} tokens (MB)", rss, "< 150", rss < 150, "")
    return out


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
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--sizes", type=lambda s: [int(float(x)) for x in s.split(",")],
                   default=[1_000, 100_000, 1_000_000])
    p.add_argument("--duration", type=float, default=4.0, help="measured seconds per phase")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=16, help="calls in flight per driver")
    p.add_argument("--rounds", type=int, default=12, help="bcrypt rounds (the default is 12)")
    p.add_argument("--warm-tokens", type=int, default=100)
    p.add_argument("--workers", type=int, default=0, help="serve --workers N (0: not given)")
    p.add_argument("--quick", action="store_true",
                   help="1k and 20k tokens, 2 s phases, 2 repeats: about two minutes")
    p.add_argument("--profile", action="store_true",
                   help="py-spy the server under warm Authenticate at the largest size")
    p.add_argument("--label", default="", help="a name for this run in the results")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: dated)")
    p.add_argument("--max-minutes", type=float, default=30.0)
    p.add_argument("--phases", type=lambda s: s.split(","), default=list(PHASES),
                   help="a subset, for tuning: " + ",".join(PHASES))
    p.add_argument("--no-report", action="store_true", help="do not update BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.duration, args.repeats = [1_000, 20_000], 2.0, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    bench = Bench(args)
    try:
        results = bench.main()
    finally:
        bench.close()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    suffix = f"-{args.label}" if args.label else ""
    out = args.out or RESULTS / f"{stamp}-{args.backend}{suffix}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {out}", file=sys.stderr)
    for t in results["targets"]:
        mark = "holds" if t["holds"] else "MISSED"
        print(f"{mark:7} {t['target']}: {t['measured']} (goal {t['goal']}) {t['where']}")
    if not args.no_report:
        from .report import update

        update(out)
    return 0
