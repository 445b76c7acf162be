"""Request builders shared by the sync and asyncio clients."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from google.protobuf import timestamp_pb2

from tokenservice.v1 import token_service_pb2 as pb


def timestamp(value: datetime | timestamp_pb2.Timestamp) -> timestamp_pb2.Timestamp:
    if isinstance(value, timestamp_pb2.Timestamp):
        return value
    if value.tzinfo is None:
        raise ValueError("expires_at must be timezone-aware (for example datetime.now(UTC))")
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def create_token(
    name: str,
    scopes: Iterable[str],
    expires_at: datetime | timestamp_pb2.Timestamp | None,
) -> pb.CreateTokenRequest:
    if isinstance(scopes, str):
        raise TypeError("scopes must be an iterable of scope names, not one string")
    request = pb.CreateTokenRequest(name=name, scopes=list(scopes))
    if expires_at is not None:
        request.expires_at.CopyFrom(timestamp(expires_at))
    return request
