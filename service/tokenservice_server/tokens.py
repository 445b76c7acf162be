"""The raw token format: tks_<lookup id><secret><checksum>.

The lookup id is random, indexed and not secret; the secret is only ever
stored as a bcrypt hash; the CRC32 checksum (base62, as GitHub's tokens do)
lets scanners and the service reject look-alikes without a database read.
"""

from __future__ import annotations

import hmac
import secrets
import zlib
from dataclasses import dataclass

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
LOOKUP_LEN = 12  # about 71 bits: collisions are negligible and retried anyway
SECRET_LEN = 32  # about 190 bits of secret randomness, 32 bytes into bcrypt
CHECKSUM_LEN = 6  # 62**6 > 2**32
DISPLAY_PREFIX_LEN = 12
_ALLOWED = frozenset(ALPHABET)


@dataclass(frozen=True, slots=True)
class ParsedToken:
    lookup_id: str
    secret: str


def _random(n: int) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(n))


def checksum(body: str) -> str:
    value = zlib.crc32(body.encode("ascii"))
    out = []
    for _ in range(CHECKSUM_LEN):
        value, digit = divmod(value, 62)
        out.append(ALPHABET[digit])
    return "".join(reversed(out))


def new_token(prefix: str) -> tuple[str, ParsedToken]:
    """Returns the raw token (shown once) and its parts."""
    lookup_id, secret = _random(LOOKUP_LEN), _random(SECRET_LEN)
    body = prefix + lookup_id + secret
    return body + checksum(body), ParsedToken(lookup_id, secret)


def display_prefix(raw: str) -> str:
    return raw[:DISPLAY_PREFIX_LEN]


def parse(raw: str, prefix: str) -> ParsedToken | None:
    """Splits a well-formed token, or returns None; never touches the database."""
    if len(raw) != len(prefix) + LOOKUP_LEN + SECRET_LEN + CHECKSUM_LEN:
        return None
    if not raw.startswith(prefix):
        return None
    rest = raw[len(prefix) :]
    if not _ALLOWED.issuperset(rest):
        return None
    body, check = raw[:-CHECKSUM_LEN], raw[-CHECKSUM_LEN:]
    if not hmac.compare_digest(checksum(body), check):
        return None
    return ParsedToken(rest[:LOOKUP_LEN], rest[LOOKUP_LEN : LOOKUP_LEN + SECRET_LEN])
