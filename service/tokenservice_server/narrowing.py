"""The one hook every change that narrows a token goes through: collect, then settle.

A change narrows a token when a consumer's cached Authenticate answer for it
may no longer be used: revocation (with a revoked subtree), rotation of the
old token, an update that narrows scopes or expiry, a user disabled or their
permissions narrowed, a leaked token revoked.

How a narrowing path uses it:

1. the store method making the change calls `Store.narrowed(token_ids=...,
   user_ids=...)` inside the transaction that makes it, so the event commits
   (or rolls back) with the change; that records a `Narrowed` here, in the
   collector of the current call;
2. whoever runs the call (the gRPC interceptor for every RPC, the command
   line for its commands) opens a collector before the rules run, and once
   they have returned, and before answering, settles what was collected:
   every watching consumer on every replica has applied the invalidation, or
   its lease has run out (`fanout.Fanout.settle` on a server's event loop,
   `fanout.settle_blocking` elsewhere).

So a new RPC or command that narrows tokens needs nothing beyond step 1 in
its store method: the gRPC interceptor already collects and settles for
every unary RPC of the service (run on a worker thread, or a coroutine whose
store calls run in `contextvars.copy_context().run`, as `aauthenticate`
does), and the command line for every user and token command. Only a new
entry point of another kind (a new command runner, a background job) must
collect and settle itself, as cli.py's `run()` does.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable

from .values import Narrowed

log = logging.getLogger("tokenservice.narrowing")

Collecting = tuple[list[Narrowed], Callable[[Narrowed], None] | None]

_collected: contextvars.ContextVar[Collecting | None] = contextvars.ContextVar(
    "narrowed", default=None
)


def collect(
    into: list[Narrowed], claim: Callable[[Narrowed], None] | None = None
) -> contextvars.Token[Collecting | None]:
    """From now on in this context, narrowing changes are appended to `into`.

    `claim`, when given, is told each event as the store writes it, before its
    transaction commits: the process settling the call delivers the event to
    its own consumers itself, and its loop reading committed events must not
    deliver it a second time (it could read it before settling begins).
    """
    return _collected.set((into, claim))


def stop(token: contextvars.Token[Collecting | None]) -> None:
    _collected.reset(token)


def record(event: Narrowed) -> None:
    """Called by the store for each narrowing event it writes."""
    collecting = _collected.get()
    if collecting is None:
        # Tests and tools that call the rules directly: nobody waits for
        # consumers, who still learn of the change by polling.
        log.debug("a narrowing change outside a collecting call", extra={"event": event.event_id})
        return
    into, claim = collecting
    if claim is not None:
        claim(event)
    into.append(event)
