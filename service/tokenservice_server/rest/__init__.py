"""The REST/JSON face of the gRPC API, derived from its `google.api.http` annotations.

- `create_app(grpc_target)`: the ASGI app, proxying over a real grpc.aio channel;
  with `local=LocalHandlers(...)`, calling the gRPC server's own wrapped
  handlers in its process instead (what `tokenservice serve` does).
- `RestServer(grpc_target, host, port, local=...)`: uvicorn on a background
  thread or on the gRPC server's loop, for `tokenservice serve`; `start()`,
  `port`, `stop(grace)`.
- `run_rest(grpc_target, host, port)`: the same in the foreground, for
  `tokenservice rest`, until SIGINT/SIGTERM.
- `RestLimits`: connections and deadlines an idle or slow client cannot stretch.
"""

from .app import RestApp, create_app
from .inprocess import LocalHandlers
from .server import RestLimits, RestServer, run_rest

__all__ = ["LocalHandlers", "RestApp", "RestLimits", "RestServer", "create_app", "run_rest"]
