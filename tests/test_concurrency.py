"""32 threads authenticating while others revoke, on both backends.

Revocation is immediate (docs/api.md, RevokeToken): no Authenticate that *starts* after
its token's RevokeToken returned may succeed. And under this load SQLite must
neither say "database is locked" nor fail any call with a server-side error.
"""

from __future__ import annotations

import collections
import random
import threading
import time

import grpc
from conftest import RunningServer, bearer

from tokenservice.v1 import token_service_pb2 as pb

AUTH_THREADS = 32
REVOKE_THREADS = 4
TOKENS = 48
MAX_CALLS_PER_THREAD = 400
MAX_SECONDS = 60.0


def test_no_authenticate_succeeds_after_its_revoke_returned(ts: RunningServer) -> None:
    boot = ts.manager()
    meta = bearer(boot)
    made = [
        ts.stub.CreateToken(pb.CreateTokenRequest(name=f"c{i}", scopes=["pass:read"]),
                            metadata=meta, timeout=10)
        for i in range(TOKENS)
    ]
    for created in made:  # warm: every secret verified once, so no bcrypt queue builds up
        ts.authenticate(created.token)

    revoked_at: dict[str, float] = {}  # token id -> monotonic time its RevokeToken returned
    lock = threading.Lock()
    auth_log: list[tuple[str, float, bool]] = []  # (token id, started, succeeded)
    bad: collections.Counter = collections.Counter()
    todo = [c.api_token.id for c in made]
    random.Random(7).shuffle(todo)
    begin = threading.Barrier(AUTH_THREADS + REVOKE_THREADS)
    deadline = time.monotonic() + MAX_SECONDS
    revokers_done = threading.Event()

    def authenticate(seed: int) -> None:
        rng = random.Random(seed)
        begin.wait()
        mine = []
        for _ in range(MAX_CALLS_PER_THREAD):
            if time.monotonic() > deadline:
                break
            created = rng.choice(made)
            started = time.monotonic()
            try:
                ts.stub.Authenticate(pb.AuthenticateRequest(token=created.token), timeout=30)
                mine.append((created.api_token.id, started, True))
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                    mine.append((created.api_token.id, started, False))
                else:
                    bad[f"Authenticate {error.code().name}: {error.details()}"] += 1
            if revokers_done.is_set() and len(mine) >= 50:
                break
        with lock:
            auth_log.extend(mine)

    def revoke() -> None:
        begin.wait()
        while time.monotonic() < deadline:
            with lock:
                if not todo:
                    return
                token_id = todo.pop()
            time.sleep(0.05)  # spread the revokes over the authentication load
            try:
                ts.stub.RevokeToken(pb.RevokeTokenRequest(id=token_id), metadata=meta,
                                    timeout=30)
            except grpc.RpcError as error:
                bad[f"RevokeToken {error.code().name}: {error.details()}"] += 1
                continue
            returned = time.monotonic()
            with lock:
                revoked_at[token_id] = returned

    threads = [threading.Thread(target=authenticate, args=(i,)) for i in range(AUTH_THREADS)]
    revokers = [threading.Thread(target=revoke) for _ in range(REVOKE_THREADS)]
    for thread in threads + revokers:
        thread.start()
    for thread in revokers:
        thread.join()
    revokers_done.set()
    for thread in threads:
        thread.join()

    late = [
        (tid, started - revoked_at[tid])
        for tid, started, ok in auth_log
        if ok and tid in revoked_at and started > revoked_at[tid]
    ]
    rejected_after = sum(
        1 for tid, started, ok in auth_log
        if not ok and tid in revoked_at and started > revoked_at[tid]
    )
    print(f"\n{ts.config.database_url.split(':')[0]}: {len(auth_log)} Authenticate calls by "
          f"{AUTH_THREADS} threads, {len(revoked_at)} revokes by {REVOKE_THREADS} threads; "
          f"{rejected_after} rejected after their revoke; other errors: {dict(bad) or 'none'}")
    assert not bad, f"calls failed with server-side errors: {dict(bad)}"
    assert len(revoked_at) == TOKENS
    assert not late, f"succeeded after their RevokeToken had returned: {late[:5]}"
    assert rejected_after > 0, "the load overlapped the revocations"
    # Afterwards every token is refused.
    for created in made[:5]:
        try:
            ts.authenticate(created.token)
            raise AssertionError("a revoked token authenticated")
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
