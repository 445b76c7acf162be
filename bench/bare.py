"""The ceiling: a bare grpc.aio server whose one unary method does nothing.

`python -m bench.bare PORT` serves `/bench.v1.Bare/Empty` on 127.0.0.1:PORT.
It is the same stack as `tokenservice serve` (grpcio's aio server, one Python
process) with none of tokenservice's work, so what h2load gets from it in the
same run is as fast as a unary call can be answered here: if tokenservice's
figures approach it, the driver is not what limits them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

import grpc

SERVICE = "bench.v1.Bare"
METHOD = "Empty"
PATH = f"/{SERVICE}/{METHOD}"


async def _empty(request: bytes, context: Any) -> bytes:
    return b""


async def serve(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    # No (de)serializers: the handler sees the request's bytes and returns none.
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(_empty)})
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(f"127.0.0.1:{port}") != port:
        raise OSError(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main() -> int:
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    asyncio.run(serve(int(sys.argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
