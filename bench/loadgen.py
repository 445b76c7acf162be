"""The one phase h2load cannot drive: cold Authenticate, a different never-seen token per call.

h2load sends one request body for the whole run, so every call would carry
the same token and only the first would be cold. This Python driver (grpc.aio,
in a process of its own on the driver's cores) hands out each token once and
checks every call's gRPC status. A cold call costs the server one bcrypt
check (tens to hundreds of milliseconds), so a few calls a second are all the
phase makes: far below what a Python driver can issue, so here it is not the
bottleneck.
"""

from __future__ import annotations

import asyncio
import os
import time
import traceback
from collections import Counter
from typing import Any

from .h2load import percentile

CALL_TIMEOUT_S = 30.0
HOST = "127.0.0.1"


async def _cold(port: int, tokens: list[str], concurrency: int, duration: float) -> dict[str, Any]:
    import grpc

    from tokenservice.v1 import token_service_pb2 as pb
    from tokenservice.v1 import token_service_pb2_grpc as pb_grpc

    latencies: list[float] = []
    codes: Counter[str] = Counter()
    queue = list(reversed(tokens))
    async with grpc.aio.insecure_channel(f"{HOST}:{port}") as channel:
        stub = pb_grpc.TokenServiceStub(channel)
        start = time.perf_counter()
        end = start + duration

        async def loop() -> None:
            while queue and time.perf_counter() < end:
                token = queue.pop()
                t0 = time.perf_counter()
                try:
                    await stub.Authenticate(pb.AuthenticateRequest(token=token),
                                            timeout=CALL_TIMEOUT_S)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as e:
                    codes[e.code().name] += 1
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(loop() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    latencies.sort()
    return {
        "rate": round(codes["OK"] / seconds, 2),
        "seconds": round(seconds, 3),
        "done": len(latencies),
        "ran_out": not queue,
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
        "codes": dict(codes),
    }


def run_cold(port: int, tokens: list[str], concurrency: int, duration: float) -> dict[str, Any]:
    """Runs in a child process; errors come back as a field, not an exception."""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    try:
        return asyncio.run(_cold(port, tokens, concurrency, duration))
    except Exception:
        return {"error": traceback.format_exc(limit=3)}


def pin(cpus: set[int] | None) -> None:
    """A pool initializer: keep the driver process on the driver's cores."""
    if cpus:
        os.sched_setaffinity(0, cpus)
