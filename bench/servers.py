"""The processes under load: `tokenservice serve`, the bare server and the peer, pinned, watched.

Each server runs under `taskset` on its own cores, writes its stderr (the
JSON log, one line per RPC) to a file of its own, and is read from /proc for
its CPU time and peak resident set. The peer is djangorestframework-api-key
on gunicorn (bench/peer_drf/).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOKENSERVICE = str(Path(sys.executable).with_name("tokenservice"))
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))
ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
# Every warm phase presents one token (h2load sends one body), so the default
# limit (600 per minute per token) would refuse nearly every call. This one
# runs the limiter on every call, as a deployment does, and refuses none.
RATE_LIMIT = "1000000/1s"
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def tree_cpu_seconds(pid: int) -> float:
    """User+system CPU so far of a process and its children (PostgreSQL's backends)."""
    pids = [pid]
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                pids += [int(p) for p in (task / "children").read_text().split()]
    total = 0.0
    for p in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def taskset(cpus: set[int] | None) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []


@dataclass
class Server:
    """One server process (and any workers it starts)."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    grpc_port: int
    http_port: int = 0
    cpus: set[int] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    log_offset: int = 0
    grpc: bool = True  # False: HTTP only (the peer)

    def pids(self) -> list[int]:
        """The process and its children (`serve --workers N` starts N)."""
        pids = [self.proc.pid]
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    pids += [int(p) for p in (task / "children").read_text().split()]
        return pids

    def cpu_seconds(self) -> float:
        """User+system CPU of the process and its children so far."""
        return sum(self.cpu_by_process().values())

    def cpu_by_process(self) -> dict[int, float]:
        """User+system CPU seconds so far of the process, then of each child."""
        out: dict[int, float] = {}
        for pid in self.pids():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                fields = stat.rsplit(")", 1)[1].split()
                out[pid] = (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
        return out

    def peak_rss_mb(self) -> dict[str, float]:
        """VmHWM (peak resident set), summed over the process and its workers, in MB."""
        peaks = []
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peaks.append(int(line.split()[1]) / 1024)
        return {"sum": round(sum(peaks), 1), "max_process": round(max(peaks, default=0), 1),
                "processes": len(peaks)}

    def mark_log(self) -> None:
        """Remembers where the log ends, so rpc_counts() sees only what follows."""
        self.log_offset = self.log_path.stat().st_size

    def settle_log(self, limit: float = 3.0) -> None:
        """Until the log stops growing: the server writes its per-RPC lines in batches, late."""
        deadline = time.monotonic() + limit
        size, still = -1, 0
        while still < 2 and time.monotonic() < deadline:
            time.sleep(0.08)
            now = self.log_path.stat().st_size
            still = still + 1 if now == size else 0
            size = now

    def rpc_counts(self) -> dict[str, dict[str, int]]:
        """Per method, how many calls the server logged with each status since mark_log()."""
        self.settle_log()
        counts: dict[str, Counter[str]] = {}
        with open(self.log_path, "rb") as f:
            f.seek(self.log_offset)
            data = f.read()
        for raw in data.splitlines():
            if b'"msg": "rpc"' not in raw:
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                continue  # a line cut by the read: counted next time, never twice
            counts.setdefault(line.get("method", "?"), Counter())[line.get("status", "?")] += 1
        return {m: dict(c) for m, c in counts.items()}

    def tail(self, chars: int = 1500, rpc_lines: bool = True) -> str:
        """The end of the log; without the per-RPC lines, what else the server said."""
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace")
            if not rpc_lines:
                text = "\n".join(line for line in text.splitlines() if '"msg": "rpc"' not in line)
            return text[-chars:]
        return ""

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def process_cpu_seconds(pid: int) -> float:
    """User+system CPU of one process so far (0 when it is gone)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS
    return 0.0


def start_tokenservice(name: str, url: str, workdir: Path, cpus: set[int] | None, *,
                       rounds: int, workers: int = 1, log_level: str = "INFO",
                       rest: bool = True, rate_limit: str = RATE_LIMIT,
                       redis_url: str | None = None, metrics: bool = True) -> Server:
    """`tokenservice serve` on free ports, logging to workdir/<name>.log.

    Rate limits are off unless asked for: one token takes every call of a phase,
    and the phases measure the rest of the path (the `limits` phases price them).
    """
    grpc_port, http_port = free_port(), free_port() if rest else 0
    command = [
        *taskset(cpus), TOKENSERVICE, "serve", "--host", HOST, "--database-url", url,
        "--grpc-port", str(grpc_port), "--bcrypt-rounds", str(rounds),
        "--rate-limit", rate_limit,
    ]
    if redis_url:
        command += ["--redis-url", redis_url]
    command += ["--http-port", str(http_port)] if rest else ["--no-rest"]
    if workers > 1:
        command += ["--workers", str(workers)]
    # A crash (a segfault in a C extension) prints every thread's Python stack to the log.
    env = {**os.environ, "GRPC_VERBOSITY": "NONE", "TOKENSERVICE_LOG_LEVEL": log_level,
           "PYTHONFAULTHANDLER": "1", "TOKENSERVICE_METRICS": "1" if metrics else "0"}
    log_path = workdir / f"{name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=env,
                                cwd=workdir, stdin=subprocess.DEVNULL)
    return Server(name, proc, log_path, grpc_port, http_port, cpus,
                  {"workers": workers, "log_level": log_level, "rest": rest,
                   "rate_limit": rate_limit, "redis": bool(redis_url), "metrics": metrics})


def start_bare(workdir: Path, cpus: set[int] | None) -> Server:
    port = free_port()
    log_path = workdir / "bare.log"
    env = {**os.environ, "GRPC_VERBOSITY": "NONE"}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([*taskset(cpus), sys.executable, "-m", "bench.bare", str(port)],
                                stdout=subprocess.DEVNULL, stderr=log, env=env,
                                cwd=Path(__file__).resolve().parents[1], stdin=subprocess.DEVNULL)
    return Server("bare", proc, log_path, port, 0, cpus, {"workers": 1})


def load_peer(database: Path, tokens: int, secret_key: str) -> str:
    """The peer's SQLite store with `tokens` API keys; returns one raw key."""
    env = {**os.environ, **peer_env(database, secret_key)}
    done = subprocess.run([sys.executable, "-m", "bench.peer_drf.load", str(tokens)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"loading the peer's store: {done.stderr[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["key"]


def peer_env(database: Path, secret_key: str) -> dict[str, str]:
    return {"DJANGO_SETTINGS_MODULE": "bench.peer_drf.settings",
            "BENCH_DRF_DATABASE": str(database), "BENCH_DRF_SECRET_KEY": secret_key}


def start_peer(name: str, database: Path, secret_key: str, workdir: Path,
               cpus: set[int] | None, workers: int) -> Server:
    """djangorestframework-api-key as its users serve it: gunicorn's sync workers, one per core.

    gunicorn's defaults otherwise (no access log); its control socket is off so
    that two runs on one machine do not share one.
    """
    port = free_port()
    log_path = workdir / f"{name}.log"
    command = [*taskset(cpus), GUNICORN, "--workers", str(workers), "--worker-class", "sync",
               "--bind", f"{HOST}:{port}", "--no-control-socket",
               "bench.peer_drf.wsgi:application"]
    env = {**os.environ, **peer_env(database, secret_key)}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=env,
                                cwd=ROOT, stdin=subprocess.DEVNULL)
    return Server(name, proc, log_path, 0, port, cpus, {"workers": workers}, grpc=False)


def wait_ready(servers: list[Server], timeout: float = 90.0) -> None:
    """Until every server answers a gRPC call (and its REST port accepts), or raise."""
    import grpc

    from .bare import PATH as BARE_PATH

    deadline = time.monotonic() + timeout
    pending = list(servers)
    while pending:
        for server in list(pending):
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited on start: {server.tail()}")
            try:
                if not server.grpc:
                    with socket.create_connection((HOST, server.http_port), timeout=1):
                        pending.remove(server)
                    continue
                with grpc.insecure_channel(f"{HOST}:{server.grpc_port}") as channel:
                    if server.name == "bare":
                        channel.unary_unary(BARE_PATH)(b"", timeout=1)
                    else:
                        from grpc_health.v1 import health_pb2, health_pb2_grpc

                        reply = health_pb2_grpc.HealthStub(channel).Check(
                            health_pb2.HealthCheckRequest(), timeout=1)
                        if reply.status != health_pb2.HealthCheckResponse.SERVING:
                            continue
                if server.http_port:
                    with socket.create_connection((HOST, server.http_port), timeout=1):
                        pass
                pending.remove(server)
            except (grpc.RpcError, OSError):
                pass
        if pending and time.monotonic() > deadline:
            names = ", ".join(s.name for s in pending)
            raise RuntimeError(f"never became ready: {names}: {pending[0].tail()}")
        if pending:
            time.sleep(0.2)
