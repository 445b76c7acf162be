"""The batched RPC log writes the same JSON lines the logging module would."""

from __future__ import annotations

import json
import os

from tokenservice_server.logs import RpcLog


def test_rpc_lines_are_json_with_every_field_and_reach_the_stream() -> None:
    read, write = os.pipe()
    log = RpcLog(fd=write, interval=3600)  # only flush() writes, so the test decides when
    log.rpc("/tokenservice.v1.TokenService/Authenticate", "OK", 0.25,
            "0b6f6f0c-7d1e-4c39-9d6a-5b3f0ad9b8c1")
    log.rpc('/odd"method\\', "UNAUTHENTICATED", 1.5, None)
    log.flush()
    os.close(write)
    with os.fdopen(read) as stream:
        lines = [json.loads(line) for line in stream.read().splitlines()]
    assert [line["method"] for line in lines] == [
        "/tokenservice.v1.TokenService/Authenticate", '/odd"method\\'
    ]
    first, second = lines
    assert first["msg"] == "rpc" and first["level"] == "info"
    assert first["logger"] == "tokenservice.rpc" and first["status"] == "OK"
    assert first["duration_ms"] == 0.25
    assert first["token_id"] == "0b6f6f0c-7d1e-4c39-9d6a-5b3f0ad9b8c1"
    assert first["ts"].endswith("Z") and len(first["ts"]) == len("2026-01-01T00:00:00.000Z")
    assert second["token_id"] is None and second["status"] == "UNAUTHENTICATED"
