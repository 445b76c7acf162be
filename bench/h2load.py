"""h2load (nghttp2's C load generator) as the driver: request bodies, its command line, its output.

A Python driver on this kind of machine saturates before a Python server
does, so the load comes from h2load: one C thread, HTTP/2 for gRPC (a unary
call is a POST whose body is the 5-byte gRPC frame header plus the serialized
message) and HTTP/1.1 (`--h1`) for REST. h2load sees HTTP statuses only: a gRPC
error still arrives as HTTP 200 with a non-zero `grpc-status` trailer, so the
run checks every gRPC phase's statuses another way (see run.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

H2LOAD = shutil.which("h2load") or "/usr/bin/h2load"
GRPC_HEADERS = (("content-type", "application/grpc"), ("te", "trailers"))
JSON_HEADERS = (("content-type", "application/json"),)


def grpc_frame(message: bytes) -> bytes:
    """A unary gRPC request body: flag 0 (not compressed), 4-byte big-endian length, message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def available() -> str | None:
    """None when h2load runs here, else what to install."""
    if not Path(H2LOAD).exists():
        return "h2load is not installed (Debian: apt-get install nghttp2-client)"
    return None


@dataclass(frozen=True)
class Load:
    """One h2load invocation: where, what body, how many connections and streams, how long."""

    url: str  # http://127.0.0.1:PORT/path
    body: Path
    connections: int
    streams: int = 1  # concurrent streams per connection (HTTP/2); 1 for --h1
    duration: float = 0.0  # -D seconds measured (after `warmup`); 0 means use `requests`
    requests: int = 0  # -n, for servers that close connections (h2load -D can hang there)
    warmup: float = 0.5
    h1: bool = False
    headers: tuple[tuple[str, str], ...] = GRPC_HEADERS

    def command(self, log_file: Path) -> list[str]:
        cmd = [H2LOAD, "-c", str(self.connections), "-m", str(self.streams),
               "-d", str(self.body), "--log-file", str(log_file)]
        if self.duration:
            # h2load takes whole numbers with a unit: "2500ms", not "2.5".
            cmd += ["-D", f"{round(self.duration * 1000)}ms",
                    "--warm-up-time", f"{round(self.warmup * 1000)}ms"]
        else:
            cmd += ["-n", str(self.requests)]
        if self.h1:
            cmd.append("--h1")
        for name, value in self.headers:
            cmd += ["-H", f"{name}: {value}"]
        return [*cmd, self.url]

    def limit(self) -> float:
        """Seconds after which a run is stuck, not slow."""
        return (self.duration + self.warmup if self.duration else 60.0) + 30.0


@dataclass
class Outcome:
    """What one h2load run reported, plus latency percentiles from its per-request log."""

    rate: float = 0.0  # requests completed per second of the measured window
    seconds: float = 0.0
    done: int = 0
    succeeded: int = 0  # HTTP 2xx/3xx as h2load counts them: gRPC errors included
    failed: int = 0
    errored: int = 0
    timeout: int = 0
    status: dict[str, int] = field(default_factory=dict)  # "2xx": n, ...
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    driver_cpu_s: float = 0.0  # h2load's own user+system CPU time
    driver_busy: float = 0.0  # driver_cpu_s over h2load's wall time: its share of one core
    error: str = ""


_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed,"
    r" (\d+) errored, (\d+) timeout")
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (0 when empty)."""
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def parse(stdout: str, log_lines: Sequence[str]) -> Outcome:
    """h2load's summary lines, and its --log-file (start µs, HTTP status, µs to the response)."""
    out = Outcome()
    m = _FINISHED.search(stdout)
    if m is None:
        out.error = "no 'finished in' line: " + stdout[-300:]
        return out
    out.seconds = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    out.rate = float(m.group(3))
    m = _REQUESTS.search(stdout)
    if m:
        (_, _, out.done, out.succeeded, out.failed, out.errored, out.timeout) = (
            int(g) for g in m.groups())
    m = _STATUS.search(stdout)
    if m:
        out.status = {k: int(v) for k, v in zip(("2xx", "3xx", "4xx", "5xx"), m.groups(),
                                                 strict=True)}
    latencies = sorted(int(parts[2]) / 1000 for line in log_lines
                       if len(parts := line.split("\t")) == 3)
    out.p50_ms = round(percentile(latencies, 0.50), 3)
    out.p90_ms = round(percentile(latencies, 0.90), 3)
    out.p99_ms = round(percentile(latencies, 0.99), 3)
    out.max_ms = round(latencies[-1], 3) if latencies else 0.0
    return out


class Running:
    """An h2load process started on the driver's cores; finish() waits and parses it."""

    def __init__(self, load: Load, workdir: Path, cpus: set[int] | None, tag: str) -> None:
        self.load = load
        self.log_file = workdir / f"h2load-{tag}-{time.monotonic_ns()}.tsv"
        command = load.command(self.log_file)
        if cpus:
            command = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *command]
        self.started = time.monotonic()
        # Its summary is a few kB: it fits the pipe, so reading after the exit is safe.
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    def _reap(self) -> tuple[int, float] | None:
        """Waits (bounded) for the exit; returns the exit code and h2load's own CPU seconds."""
        deadline = self.started + self.load.limit()
        while time.monotonic() < deadline:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                return self.proc.returncode, usage.ru_utime + usage.ru_stime
            time.sleep(0.02)
        return None

    def finish(self) -> Outcome:
        reaped = self._reap()
        wall = time.monotonic() - self.started
        if reaped is None:
            self.proc.kill()
            self.proc.wait()
            self.log_file.unlink(missing_ok=True)
            return Outcome(error=f"h2load did not finish in {self.load.limit():.0f} s")
        code, cpu = reaped
        assert self.proc.stdout is not None
        stdout = self.proc.stdout.read().decode(errors="replace")
        self.proc.stdout.close()
        try:
            lines = self.log_file.read_text().splitlines()
        except OSError:
            lines = []
        self.log_file.unlink(missing_ok=True)
        out = parse(stdout, lines)
        if code != 0 and not out.error:
            out.error = f"h2load exited {code}: {stdout[-300:]!r}"
        out.driver_cpu_s = round(cpu, 3)
        out.driver_busy = round(cpu / wall, 3) if wall > 0 else 0.0
        return out


def run(load: Load, workdir: Path, cpus: set[int] | None, tag: str = "run") -> Outcome:
    """One h2load run, start to finish."""
    return Running(load, workdir, cpus, tag).finish()


def run_together(loads: Sequence[tuple[Load, str]], workdir: Path, cpus: set[int] | None,
                 stagger: float = 0.0) -> list[Outcome]:
    """Several h2load runs at once (a good client beside a flood), started `stagger` s apart."""
    running: list[Running] = []
    for i, (load, tag) in enumerate(loads):
        if i and stagger:
            time.sleep(stagger)
        running.append(Running(load, workdir, cpus, tag))
    return [r.finish() for r in running]


def describe(load: Load) -> dict[str, Any]:
    """The settings of a run, for the results file."""
    return {"connections": load.connections, "streams": load.streams,
            "duration_s": load.duration, "requests": load.requests, "warmup_s": load.warmup,
            "h1": load.h1}
