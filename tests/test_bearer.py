"""The one reading of `authorization: Bearer <token>` that server, shim and client share."""

from __future__ import annotations

import pytest

from tokenservice_client import parse_bearer


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("Bearer tok_abc", "tok_abc"),
        ("bearer tok_abc", "tok_abc"),
        ("BEARER tok_abc", "tok_abc"),
        ("  Bearer   tok_abc  ", "tok_abc"),
        ("Bearer", None),
        ("Bearer    ", None),
        ("", None),
        ("Basic dXNlcjpwYXNz", None),
        ("Bearertok_abc", None),
        ("tok_abc", None),
    ],
)
def test_parse_bearer(value: str, token: str | None) -> None:
    """A caller's header is read the same way wherever it arrives."""
    assert parse_bearer(value) == token
