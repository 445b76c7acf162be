"""`python -m bench.peer_drf.load N`: migrate the peer's SQLite store and create N API keys.

Run by the bench in a process of its own (Django's settings are per
process), with BENCH_DRF_DATABASE and BENCH_DRF_SECRET_KEY set. Keys are made
by the library's own generator and hasher (one SHA-512 each), in bulk; the
last line printed is one raw key, as JSON, for the load to present.
"""

import json
import os
import sys

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.peer_drf.settings")


def main() -> int:
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import transaction
    from rest_framework_api_key.models import APIKey

    n = int(sys.argv[1])
    call_command("migrate", verbosity=0)
    generator = APIKey.objects.key_generator
    raw: list[str] = []
    batch: list[APIKey] = []
    with transaction.atomic():
        for i in range(n):
            key, prefix, hashed = generator.generate()
            batch.append(APIKey(id=f"{prefix}.{hashed}", prefix=prefix, hashed_key=hashed,
                                name=f"user-{i % 100}"))
            if len(raw) < 1 and i == n // 2:
                raw.append(key)
            if len(batch) >= 5_000:
                APIKey.objects.bulk_create(batch)
                batch = []
        APIKey.objects.bulk_create(batch)
    print(json.dumps({"key": raw[0], "count": APIKey.objects.count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
