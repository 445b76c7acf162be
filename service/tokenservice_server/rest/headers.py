"""Headers a successful reply carries, by its message type: one table, served and documented."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any


def rate_limit_headers(reply: Any) -> dict[str, str]:
    """AuthenticateResponse.rate_limit as the IETF RateLimit-* headers (none when unset).

    RateLimit-Reset is in whole seconds from now, rounded up: a caller that
    waits that long finds the token rested.
    """
    if not reply.HasField("rate_limit"):
        return {}
    status = reply.rate_limit
    reset = status.reset_time.seconds + status.reset_time.nanos / 1e9 - time.time()
    return {
        "RateLimit-Limit": str(status.limit),
        "RateLimit-Remaining": str(status.remaining),
        "RateLimit-Reset": str(max(0, math.ceil(reset))),
    }


_COUNT = {"type": "integer", "minimum": 0}

# Message full name -> (the headers of a reply, their OpenAPI description).
RESPONSE_HEADERS: dict[str, Callable[[Any], dict[str, str]]] = {
    "tokenservice.v1.AuthenticateResponse": rate_limit_headers,
}
RESPONSE_HEADER_DOCS: dict[str, dict[str, dict[str, Any]]] = {
    "tokenservice.v1.AuthenticateResponse": {
        "RateLimit-Limit": {
            "description": "The calls the token may make per period (absent: no limit).",
            "schema": _COUNT,
        },
        "RateLimit-Remaining": {
            "description": "The calls left in the window after this one; 0 when a call "
                           "made at once would be refused.",
            "schema": _COUNT,
        },
        "RateLimit-Reset": {
            "description": "Seconds until the token is fully rested.",
            "schema": _COUNT,
        },
    },
}
