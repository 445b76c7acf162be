"""`python -m bench.fairness`: what one tenant's flood of wrong secrets costs another's cold checks.

A tenant ("evil", several client addresses, never throttled: think of many
machines) keeps checking wrong secrets for its own 40 tokens from 30 threads
in another process. Meanwhile a client of another tenant ("acme") authenticates
tokens whose secrets the server has never checked, one call at a time: each
needs a bcrypt check. The same victim loop also runs with no flood; phases
alternate (alone, flood, flood, alone, ...) so the machine's drift falls on both.
The figure is the victim's successful first-time verifications per second under
the flood as a share of the same without it, measured in one run.

Every token of a tenant shares one secret and so one bcrypt hash (computed
once, at the server's rounds): each still has its own lookup id, so each is a
first-time check for the server, whose cache is keyed by lookup id and secret.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import bcrypt
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tokenservice.v1 import token_service_pb2 as pb
from tokenservice.v1 import token_service_pb2_grpc as pb_grpc

TOKENSERVICE = str(Path(sys.executable).with_name("tokenservice"))
PREFIX = "tks_"
VICTIM = (("x-forwarded-for", "203.0.113.7"),)


def _raw(lookup_id: str, secret: str) -> str:
    from tokenservice_server import tokens

    body = PREFIX + lookup_id + secret
    return body + tokens.checksum(body)


def _lookup_id() -> str:
    from tokenservice_server import tokens

    return tokens.new_token(PREFIX)[1].lookup_id


def _new_secret() -> str:
    from tokenservice_server import tokens

    return tokens.new_token(PREFIX)[1].secret


def make_store(url: str, rounds: int, victims: int) -> tuple[list[str], list[str]]:
    """Users and tokens written straight to the store; returns (victim, flood) raw tokens."""
    from tokenservice_server.migrations import open_migrated
    from tokenservice_server.store import Store
    from tokenservice_server.values import NewToken

    store = Store(open_migrated(url))
    out: dict[str, list[str]] = {}
    with store.connection():
        for org, count in (("acme", victims), ("evil", 40)):
            user = store.add_user(f"{org}@{org}.test", org, ["pass:read"], time.time_ns() // 1000)
            secret = _new_secret()
            hashed = bcrypt.hashpw(secret.encode(), bcrypt.gensalt(rounds)).decode()
            out[org] = []
            for _ in range(count):
                lookup = _lookup_id()
                now = time.time_ns() // 1000
                store.insert_token(NewToken(
                    lookup_id=lookup, token_prefix=(PREFIX + lookup)[:12], secret_hash=hashed,
                    name=org, scopes=("pass:read",), expires_at=None,
                    created_at=now, user_id=user.id, org_id=org,
                ), [], now)
                out[org].append(_raw(lookup, secret))
    store.close()
    return out["acme"], out["evil"]


def flood(target: str, tokens: list[str], threads: int, addresses: int,
          stop: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    """Wrong secrets for `tokens`, from `threads` threads and `addresses` client addresses."""

    def run(i: int) -> None:
        metadata = (("x-forwarded-for", f"198.51.100.{i % addresses + 1}"),)
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.TokenServiceStub(channel)
            n = i
            while not stop.is_set():
                n += 1
                raw = tokens[n % len(tokens)]
                wrong = _raw(raw[len(PREFIX):len(PREFIX) + 12], uuid.uuid4().hex)
                try:
                    stub.Authenticate(pb.AuthenticateRequest(token=wrong), metadata=metadata,
                                      timeout=10)
                except grpc.RpcError:
                    pass

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def victim_phase(stub: pb_grpc.TokenServiceStub, tokens: list[str], seconds: float) -> dict:
    ok, refused, latencies = 0, {}, []
    end = time.monotonic() + seconds
    while time.monotonic() < end and tokens:
        raw = tokens.pop()
        started = time.perf_counter()
        try:
            stub.Authenticate(pb.AuthenticateRequest(token=raw), metadata=VICTIM, timeout=10)
            ok += 1
            latencies.append(time.perf_counter() - started)
        except grpc.RpcError as error:
            refused[error.details()] = refused.get(error.details(), 0) + 1
    return {"ok_per_s": ok / seconds, "ok": ok, "refused": refused,
            "p50_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="bcrypt rounds (default 10)")
    parser.add_argument("--seconds", type=float, default=15.0, help="per phase")
    parser.add_argument("--repeat", type=int, default=2, help="alone/flood pairs")
    parser.add_argument("--threads", type=int, default=30)
    parser.add_argument("--addresses", type=int, default=3, help="flooding client addresses")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/fair.db"
        per_phase = int(args.seconds * 1000 / max(1, 2 ** (args.rounds - 4))) + 50
        victims, own = make_store(url, args.rounds, per_phase * 2 * args.repeat)
        port = _free_port()
        env = {**os.environ, "TOKENSERVICE_LOG_LEVEL": "WARNING",
               # The flooding tenant has many machines: no per-client throttle stops it.
               "TOKENSERVICE_AUTH_FAILURE_BURST": "1000000",
               "TOKENSERVICE_LOOKUP_FAILURE_BURST": "1000000"}
        server = subprocess.Popen(
            [TOKENSERVICE, "serve", "--no-rest", "--grpc-port", str(port), "--database-url", url,
             "--bcrypt-rounds", str(args.rounds)], env=env, stderr=subprocess.DEVNULL)
        target = f"127.0.0.1:{port}"
        results: dict[str, list[dict]] = {"alone": [], "flood": []}
        try:
            with grpc.insecure_channel(target) as channel:
                _wait_serving(channel)
                stub = pb_grpc.TokenServiceStub(channel)
                order = ["alone", "flood", "flood", "alone"] * args.repeat
                for phase in order[: 2 * args.repeat]:  # ABBA: neighbours pair up
                    stop = multiprocessing.Event()
                    attacker = None
                    if phase == "flood":
                        attacker = multiprocessing.Process(
                            target=flood, args=(target, own, args.threads, args.addresses, stop))
                        attacker.start()
                        time.sleep(2.0)  # let the flood fill the pool first
                    results[phase].append(victim_phase(stub, victims, args.seconds))
                    stop.set()
                    if attacker is not None:
                        attacker.join()
        finally:
            server.terminate()
            server.wait(30)
    alone = statistics.mean(r["ok_per_s"] for r in results["alone"])
    flooded = statistics.mean(r["ok_per_s"] for r in results["flood"])
    # Each flood phase against the alone phase next to it (alone, flood | flood, alone):
    # the machine's drift between distant phases falls out of the ratio.
    ratios = [f["ok_per_s"] / a["ok_per_s"] if a["ok_per_s"] else 0.0
              for a, f in zip(results["alone"], results["flood"], strict=True)]
    print(json.dumps({"rounds": args.rounds, "phases": results,
                      "victim_ok_per_s_alone": round(alone, 2),
                      "victim_ok_per_s_flood": round(flooded, 2),
                      "flood_over_alone_per_pair": [round(r, 3) for r in ratios],
                      "flood_cost": round(1 - statistics.median(ratios), 3)}, indent=1))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not start")


if __name__ == "__main__":
    main()
