"""The load: a driver process running one phase at a time with grpc.aio (or raw HTTP/1.1).

A driver is a separate process, so the server's CPU is measured apart from
the client's. Every phase stops by itself: `concurrency` loops issue calls
back to back until the phase's deadline; each call has its own deadline too.
Only 127.0.0.1 is ever a target.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

CALL_TIMEOUT_S = 10.0
CHANNELS = 4
HOST = "127.0.0.1"


class HttpStatus(Exception):
    """A REST call answered with something other than 200."""


def unused_request() -> Any:
    """ListTokens filtered as the console's "unused for 90 days" list asks."""
    from tokenservice.v1 import token_service_pb2 as pb

    request = pb.ListTokensRequest(state=pb.ApiToken.ACTIVE)
    request.not_used_since.FromMicroseconds(time.time_ns() // 1000 - 90 * 86_400_000_000)
    return request


@dataclass
class Phase:
    kind: str  # health | auth | list | list_filtered | audit | create | rest_auth
    grpc_port: int
    http_port: int
    tokens: list[str]
    concurrency: int
    duration: float
    warmup: float = 0.5
    unique: bool = False  # each token used once (cold phase); the phase ends when they run out
    bearer: str = ""  # caller's token for list/create
    start_at: float = 0.0  # wall-clock time to begin, so two drivers overlap exactly


@dataclass
class Result:
    kind: str
    calls: int = 0  # completed in the measured window (any status)
    ok: int = 0
    seconds: float = 0.0
    rate: float = 0.0  # successful calls per second
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    codes: dict[str, int] = field(default_factory=dict)
    ran_out: bool = False
    error: str = ""


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


async def _run(phase: Phase) -> Result:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tokenservice.v1 import token_service_pb2 as pb
    from tokenservice.v1 import token_service_pb2_grpc as pb_grpc

    if phase.start_at:
        await asyncio.sleep(max(0.0, phase.start_at - time.time()))
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    start = time.perf_counter()
    measure_from = start + phase.warmup
    end = measure_from + phase.duration
    tokens = phase.tokens
    next_index = 0
    ran_out = False

    def next_token() -> str | None:
        nonlocal next_index, ran_out
        if not tokens:
            return ""
        if next_index >= len(tokens):
            if phase.unique:
                ran_out = True
                return None
            next_index = 0
        token = tokens[next_index]
        next_index += 1
        return token

    async def loop(call: Any) -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                return
            token = next_token()
            if token is None:
                return
            try:
                await call(token)
                code = "OK"
            except grpc.aio.AioRpcError as e:
                code = e.code().name
            except HttpStatus as e:
                code = str(e)
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as e:
                code = type(e).__name__
            t1 = time.perf_counter()
            # Counted by completion time, so calls longer than the warm-up still count.
            if measure_from <= t1 <= end:
                latencies.append(t1 - t0)
                codes[code] += 1

    if phase.kind == "rest_auth":
        loops = [_http_loop(phase, loop) for _ in range(phase.concurrency)]
        await asyncio.gather(*loops)
    else:
        # Several connections, as many consumers would open: with `serve --workers N`
        # the kernel spreads connections (not calls) over the workers.
        options = [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.aio.insecure_channel(f"{HOST}:{phase.grpc_port}", options)
                    for _ in range(min(CHANNELS, phase.concurrency))]
        metadata = (("authorization", f"Bearer {phase.bearer}"),)
        check = health_pb2.HealthCheckRequest()

        def caller(channel: Any) -> Any:
            stub = pb_grpc.TokenServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)

            async def call(token: str) -> None:
                if phase.kind == "health":
                    await health.Check(check, timeout=CALL_TIMEOUT_S)
                elif phase.kind == "auth":
                    await stub.Authenticate(pb.AuthenticateRequest(token=token),
                                            timeout=CALL_TIMEOUT_S)
                elif phase.kind == "list":
                    await stub.ListTokens(pb.ListTokensRequest(), metadata=metadata,
                                          timeout=CALL_TIMEOUT_S)
                elif phase.kind == "list_filtered":
                    # The console's "active, unused for 90 days".
                    await stub.ListTokens(unused_request(), metadata=metadata,
                                          timeout=CALL_TIMEOUT_S)
                elif phase.kind == "audit":
                    await stub.ListAuditEvents(pb.ListAuditEventsRequest(), metadata=metadata,
                                               timeout=CALL_TIMEOUT_S)
                elif phase.kind == "create":
                    await stub.CreateToken(
                        pb.CreateTokenRequest(name="bench", scopes=["pass:read"]),
                        metadata=metadata, timeout=CALL_TIMEOUT_S,
                    )
                else:
                    raise ValueError(phase.kind)

            return call

        try:
            for channel in channels:
                await asyncio.wait_for(channel.channel_ready(), CALL_TIMEOUT_S)
            calls = [caller(c) for c in channels]
            await asyncio.gather(*(loop(calls[i % len(calls)])
                                   for i in range(phase.concurrency)))
        finally:
            for channel in channels:
                await channel.close()
    latencies.sort()
    seconds = phase.duration
    if ran_out:  # the cold phase may use up its tokens before the deadline
        seconds = max(1e-3, min(phase.duration, time.perf_counter() - measure_from))
    ok = codes.get("OK", 0)
    return Result(
        kind=phase.kind,
        calls=len(latencies),
        ok=ok,
        seconds=round(seconds, 3),
        rate=round(ok / seconds, 1),
        p50_ms=round(_percentile(latencies, 0.50) * 1000, 3),
        p99_ms=round(_percentile(latencies, 0.99) * 1000, 3),
        codes=dict(codes),
        ran_out=ran_out,
    )


async def _http_loop(phase: Phase, loop: Any) -> None:
    """REST Authenticate over one keep-alive HTTP/1.1 connection: a minimal client,
    so the client's own cost stays as small as grpc.aio's."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(HOST, phase.http_port), CALL_TIMEOUT_S
    )

    async def call(token: str) -> None:
        body = json.dumps({"token": token}).encode()
        writer.write(
            b"POST /api/v1/authenticate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CALL_TIMEOUT_S)
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await asyncio.wait_for(reader.readexactly(length), CALL_TIMEOUT_S)
        status = int(head[9:12])
        if status != 200:
            raise HttpStatus(f"HTTP_{status}")

    try:
        await loop(call)
    finally:
        writer.close()


def run_phase(phase: Phase) -> Result:
    try:
        return asyncio.run(_run(phase))
    except Exception:
        return Result(kind=phase.kind, error=traceback.format_exc(limit=3))


def driver_main(conn: Any) -> None:
    """A driver process: phases in, results out, until it receives None."""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    while True:
        message = conn.recv()
        if message is None:
            return
        conn.send(asdict(run_phase(Phase(**message))))
