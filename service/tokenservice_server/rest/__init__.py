"""The REST/JSON face of the gRPC API, derived from its `google.api.http` annotations.

- `create_app(grpc_target)`: the ASGI app, proxying over a real grpc.aio channel.
- `RestServer(grpc_target, host, port)`: uvicorn on a background thread, for
  `tokenservice serve`; `start()`, `port`, `stop(grace)`.
- `run_rest(grpc_target, host, port)`: the same in the foreground, for
  `tokenservice rest`, until SIGINT/SIGTERM.
- `RestLimits`: connections and deadlines an idle or slow client cannot stretch.
"""

from .app import RestApp, create_app
from .server import RestLimits, RestServer, run_rest

__all__ = ["RestApp", "RestLimits", "RestServer", "create_app", "run_rest"]
