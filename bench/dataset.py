"""Bulk-loading N tokens straight through the models, fast enough for 1M on SQLite.

Hashing a million secrets at 12 bcrypt rounds would take about a day of CPU,
so the filler tokens share DISTINCT_SECRETS secrets and their precomputed
hashes: every token has its own random lookup id (the indexed key the hot path
reads), and its secret is secrets[crc32(lookup_id) % DISTINCT_SECRETS]. We
know every secret, so any stored token can be turned back into a valid raw
token, which is what the cold phase needs (a token the server has never
verified costs exactly one bcrypt check, whatever its hash is shared with).
The verified-secret cache is keyed by lookup id and secret, so sharing hashes
gives the server no shortcut.
"""

from __future__ import annotations

import json
import random
import time
import uuid
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import bcrypt

from tokenservice_server import tokens
from tokenservice_server.db import connection, is_sqlite, open_database
from tokenservice_server.migrations import migrate
from tokenservice_server.models import ApiToken, AuditEvent, User
from tokenservice_server.scopes import ScopeCatalog

PREFIX = "tks_"
ORG = "bench-org"
ADMIN_EMAIL = "admin@bench.example"
FILLER_USERS = 100
DISTINCT_SECRETS = 16
BATCH = 20_000
FILLER_SCOPES = (["pass:read"], ["pass:read", "invoice.view"], ["loyalty:manage", "pass:create"])
SCOPES_JSON = tuple(json.dumps(s) for s in FILLER_SCOPES)


def _hash(args: tuple[str, int]) -> str:
    secret, rounds = args
    return bcrypt.hashpw(secret.encode("ascii"), bcrypt.gensalt(rounds)).decode("ascii")


def raw_token(lookup_id: str, secret: str) -> str:
    body = PREFIX + lookup_id + secret
    return body + tokens.checksum(body)


@dataclass
class Sample:
    warm: list[str]  # raw tokens, authenticated once before measuring
    cold: list[str]  # raw tokens never presented to this server process
    admin: str  # raw token with api_token:manage and api_token:admin


class Dataset:
    """One database of N tokens; grow() loads only the difference to the next N."""

    def __init__(self, url: str, rounds: int, seed: int = 6) -> None:
        self.url = url
        self.rounds = rounds
        self.rng = random.Random(seed)
        self.db = open_database(url, max_connections=4)
        self.count = 0
        self.load_seconds = 0.0
        self.secrets = [
            "".join(self.rng.choices(tokens.ALPHABET, k=tokens.SECRET_LEN))
            for _ in range(DISTINCT_SECRETS)
        ]
        self.hashes: list[str] = []
        self.admin_raw = ""
        self.filler_users: list[str] = []
        self._base = time.time_ns() // 1000 - 30 * 86_400 * 1_000_000

    def secret_for(self, lookup_id: str) -> str:
        return self.secrets[zlib.crc32(lookup_id.encode("ascii")) % DISTINCT_SECRETS]

    def setup(self, hashes: list[str] | None = None) -> None:
        """Schema, users, the distinct hashes and the admin's real token.

        `hashes` are another Dataset's (same seed, so the same secrets): a run
        with one database per store size hashes the secrets once."""
        migrate(self.db)
        if hashes is not None:
            self.hashes = list(hashes)
        else:
            with ProcessPoolExecutor(max_workers=2) as pool:
                self.hashes = list(pool.map(_hash, [(s, self.rounds) for s in self.secrets]))
        everything = [s.name for s in ScopeCatalog.load(None)]
        now = time.time_ns() // 1000
        with connection(self.db), self.db.atomic():
            admin_id = uuid.uuid4()
            User.create(id=admin_id, email=ADMIN_EMAIL, org_id=ORG, permissions=everything,
                        created_at=now)
            for i in range(FILLER_USERS):
                uid = uuid.uuid4()
                User.create(id=uid, email=f"user{i}@bench.example", org_id=ORG,
                            permissions=everything, created_at=now)
                self.filler_users.append(uid.hex)
            # The admin's token: the one whose hash is its own (a real CreateToken would
            # do the same), used as the caller of ListTokens and CreateToken.
            raw, parts = tokens.new_token(PREFIX)
            ApiToken.create(
                id=uuid.uuid4(), lookup_id=parts.lookup_id, token_prefix=raw[:12],
                secret_hash=_hash((parts.secret, self.rounds)), name="bench admin",
                scopes=["api_token:manage", "api_token:admin", "pass:read", "invoice.view"],
                created_at=self._base, user=admin_id, org_id=ORG,
            )
            self.admin_raw = raw
        self.count = 1

    def grow(self, target: int) -> float:
        """Inserts filler tokens until `target` are stored; returns the seconds it took."""
        start = time.perf_counter()
        fields = [
            ApiToken.id, ApiToken.lookup_id, ApiToken.token_prefix, ApiToken.secret_hash,
            ApiToken.name, ApiToken.scopes, ApiToken.expires_at, ApiToken.revoked_at,
            ApiToken.created_at, ApiToken.user, ApiToken.org_id, ApiToken.last_used_day,
        ]
        # The model writes the statement; SQLite then runs it with executemany (one
        # prepared statement, no per-row SQL), PostgreSQL gets multi-row VALUES.
        one_row = ApiToken.insert({f: None for f in fields})
        # And one audit event per token (its token.create), so ListAuditEvents
        # reads a log as large as the token table.
        audit_fields = [
            AuditEvent.id, AuditEvent.time, AuditEvent.action, AuditEvent.org_id,
            AuditEvent.actor_user_id, AuditEvent.actor_email, AuditEvent.actor_token_id,
            AuditEvent.token_id, AuditEvent.client_address, AuditEvent.details,
        ]
        audit_sql, _ = AuditEvent.insert({f: None for f in audit_fields}).sql()
        sqlite = is_sqlite(self.db)
        with connection(self.db):
            if sqlite:
                self.db.execute_sql("PRAGMA synchronous = OFF")
            else:
                # The server's statement timeout guards requests, not a bulk load on a
                # busy machine: this session only.
                self.db.execute_sql("SET statement_timeout = 0")
                self.db.execute_sql("SET idle_in_transaction_session_timeout = 0")
            sql, params = one_row.sql()
            assert len(params) == len(fields) and sql.index('"user_id"') < sql.index('"org_id"')
            while self.count < target:
                n = min(BATCH, target - self.count)
                rows = [self._row(self.count + i) for i in range(n)]
                events = [self._event(row) for row in rows]
                with self.db.atomic():
                    if sqlite:
                        self.db.cursor().executemany(sql, rows)
                        self.db.cursor().executemany(audit_sql, events)
                    else:
                        for chunk in range(0, n, 2_000):
                            ApiToken.insert_many(rows[chunk : chunk + 2_000], fields=fields) \
                                .execute()
                            AuditEvent.insert_many(events[chunk : chunk + 2_000],
                                                   fields=audit_fields).execute()
                self.count += n
            if sqlite:
                self.db.execute_sql("PRAGMA synchronous = FULL")
            else:
                self.db.execute_sql("ANALYZE")
        elapsed = time.perf_counter() - start
        self.load_seconds += elapsed
        return elapsed

    def _row(self, i: int) -> tuple:
        rng = self.rng
        lookup_id = "".join(rng.choices(tokens.ALPHABET, k=tokens.LOOKUP_LEN))
        secret_index = zlib.crc32(lookup_id.encode("ascii")) % DISTINCT_SECRETS
        created = self._base + (i + 1) * 1_000
        # A realistic mix: 10 % expiring (in the future), 1 % revoked.
        expires = created + 400 * 86_400 * 1_000_000 if i % 10 == 3 else None
        revoked = created + 1_000 if i % 100 == 7 else None
        return (
            uuid.UUID(int=rng.getrandbits(128), version=4).hex,
            lookup_id,
            (PREFIX + lookup_id)[:12],
            self.hashes[secret_index],
            f"filler {i}",
            SCOPES_JSON[i % len(SCOPES_JSON)],
            expires,
            revoked,
            created,
            self.filler_users[i % FILLER_USERS],
            ORG,
            0,  # last_used_day: never used
        )

    def _event(self, row: tuple) -> tuple:
        token_hex, created = row[0], row[8]
        event_id = uuid.UUID(int=self.rng.getrandbits(128), version=4)
        return (
            event_id.hex, created, "token.create", ORG, "", "cli", "",
            str(uuid.UUID(hex=token_hex)), "", '{"name":"filler"}',
        )

    def sample(self, warm: int, cold: int) -> Sample:
        """Valid tokens spread over the whole table, by random lookup ids."""
        with connection(self.db):
            # The lookup-id index in random order: a key range from a random start.
            rows: list[str] = []
            tries = 0
            while len(rows) < warm + cold and tries < 50:
                tries += 1
                start = "".join(self.rng.choices(tokens.ALPHABET, k=3))
                cursor = self.db.execute_sql(
                    "SELECT lookup_id FROM api_tokens WHERE lookup_id >= {p} AND revoked_at IS"
                    " NULL AND name LIKE {p} ORDER BY lookup_id LIMIT {p}".format(
                        p="?" if is_sqlite(self.db) else "%s"
                    ),
                    # The pattern is a parameter: psycopg2 reads a bare % as a placeholder.
                    (start, "filler %", max(1, (warm + cold) // 20)),
                )
                rows.extend(r[0] for r in cursor.fetchall())
        rows = list(dict.fromkeys(rows))
        self.rng.shuffle(rows)
        raws = [raw_token(lid, self.secret_for(lid)) for lid in rows[: warm + cold]]
        return Sample(warm=raws[:warm], cold=raws[warm:], admin=self.admin_raw)

    def close(self) -> None:
        self.db.close()
