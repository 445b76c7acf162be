"""Recognising tokenservice tokens in text, for secret scanners: a pattern, then the checksum.

A token is `<prefix><lookup id: 12><secret: 32><checksum: 6>`, all of
`[0-9A-Za-z]` after the prefix (default `tks_`), the checksum being the CRC32
of everything before it in base 62. The regular expression finds candidates;
`is_token` keeps only those whose checksum matches, so a scanner reports
almost no random look-alikes (one in 62**6), and does so without asking the
service. The service repeats the same check before any database read.

    python -m tokenservice_client.scanning [FILE ...]
        prints every token found (stdin without FILE); exit 1 if any
    python -m tokenservice_client.scanning --report HOST:PORT --source URL [FILE ...]
        reports them to ReportLeakedTokens, which revokes each real one
"""

from __future__ import annotations

import argparse
import re
import sys
import zlib
from collections.abc import Iterator, Sequence

__all__ = [
    "DEFAULT_PREFIX",
    "TOKEN_REGEX",
    "find_tokens",
    "is_token",
    "token_pattern",
]

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
DEFAULT_PREFIX = "tks_"
BODY_LENGTH = 12 + 32  # lookup id and secret
CHECKSUM_LENGTH = 6
# The default token, for scanners configured with a pattern alone (gitleaks,
# trufflehog): the prefix, 50 characters of [0-9A-Za-z], not inside a longer word.
TOKEN_REGEX = r"\btks_[0-9A-Za-z]{50}\b"


def token_pattern(prefix: str = DEFAULT_PREFIX) -> re.Pattern[str]:
    """The candidate pattern for tokens with this prefix."""
    return re.compile(
        r"(?<![0-9A-Za-z_])" + re.escape(prefix)
        + f"[0-9A-Za-z]{{{BODY_LENGTH + CHECKSUM_LENGTH}}}(?![0-9A-Za-z_])"
    )


def _checksum(body: str) -> str:
    value = zlib.crc32(body.encode("ascii"))
    out = []
    for _ in range(CHECKSUM_LENGTH):
        value, digit = divmod(value, 62)
        out.append(ALPHABET[digit])
    return "".join(reversed(out))


def is_token(candidate: str, prefix: str = DEFAULT_PREFIX) -> bool:
    """True if `candidate` has a token's shape and its checksum matches."""
    if not token_pattern(prefix).fullmatch(candidate):
        return False
    return _checksum(candidate[:-CHECKSUM_LENGTH]) == candidate[-CHECKSUM_LENGTH:]


def find_tokens(text: str, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Every token in `text` whose checksum matches, in order, without repeats."""
    found: dict[str, None] = {}
    for match in token_pattern(prefix).finditer(text):
        if is_token(match.group(0), prefix):
            found.setdefault(match.group(0))
    return list(found)


def _read(paths: Sequence[str]) -> Iterator[str]:
    if not paths:
        yield sys.stdin.read()
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield f.read()


def _batches(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tokenservice_client.scanning",
        description="Find tokenservice tokens in text; optionally report them as leaked.",
    )
    parser.add_argument("files", nargs="*", help="files to scan (default: stdin)")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX)
    parser.add_argument("--report", metavar="TARGET",
                        help="gRPC target of tokenservice: report what is found as leaked")
    parser.add_argument("--source", default="", help="where the text was found, e.g. a URL")
    parser.add_argument("--insecure", action="store_true", help="plaintext gRPC channel")
    args = parser.parse_args(argv)
    found: dict[str, None] = {}
    for text in _read(args.files):
        for token in find_tokens(text, args.prefix):
            found.setdefault(token)
    tokens = list(found)
    if not args.report:
        for token in tokens:
            print(token)
        return 1 if tokens else 0
    from .client import TokenServiceClient

    with TokenServiceClient(args.report, insecure=args.insecure) as client:
        for batch in _batches(tokens, 100):
            for result in client.report_leaked_tokens(batch, args.source).results:
                print(f"{result.token_prefix}\t{'revoked' if result.revoked else 'not ours'}")
    return 1 if tokens else 0


if __name__ == "__main__":
    sys.exit(main())
