"""Makes the README's console screenshots: docs/console-{list,create,rotate}.png.

    .venv/bin/python docs/screenshots.py [--out DIR]

Starts a throwaway tokenservice (SQLite in a temporary directory) with its REST
shim, fills it with a few tokens, and photographs the console in Debian's
headless Chromium (/usr/bin/chromium) through Playwright.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

from playwright.sync_api import sync_playwright

from tokenservice_server.config import Config
from tokenservice_server.rest import RestServer
from tokenservice_server.server import TokenServer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
PERMISSIONS = ["api_token:manage", "pass:read", "pass:create", "loyalty:manage", "invoice.view"]


def call(base: str, method: str, path: str, token: str | None, body: dict | None = None) -> dict:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def day(days: int) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).strftime("%Y-%m-%dT23:59:59Z")


def seed(server: TokenServer, base: str) -> str:
    """A user, a sign-in token and a few API keys in different states; returns the sign-in token."""
    with server.store.connection():
        server.service.add_user("you@example.com", "acme", PERMISSIONS)
        console = server.service.mint_for_email("you@example.com", "Console", PERMISSIONS, None).raw
    per_minute = {"requests": 600, "period": "60s"}
    keys = [
        ("CI/CD Pipeline", ["pass:read"], None, None),
        ("Nightly invoice export", ["invoice.view"], day(90), {"requests": 10, "period": "3600s"}),
        ("Sync Service", ["pass:read", "loyalty:manage"], None, per_minute),
        ("POS Integration", ["pass:read", "pass:create", "loyalty:manage"], day(365), None),
    ]
    created = {}
    for name, scopes, expires, limit in keys:
        body = {"name": name, "scopes": scopes, **({"expiresAt": expires} if expires else {}),
                **({"rateLimit": limit} if limit else {})}
        created[name] = call(base, "POST", "/api/v1/api-tokens", console, body)
    for name in ("POS Integration", "Sync Service"):  # in use: sets lastUsedAt
        call(base, "POST", "/api/v1/authenticate", None, {"token": created[name]["token"]})
    revoked = created["CI/CD Pipeline"]["apiToken"]["id"]
    call(base, "DELETE", f"/api/v1/api-tokens/{revoked}", console)
    # Rotated with a day's grace: the old and the new key are both listed, linked.
    rotated = created["Sync Service"]["apiToken"]["id"]
    call(base, "POST", f"/api/v1/api-tokens/{rotated}:rotate", console, {"gracePeriod": "86400s"})
    return console


def photograph(base: str, token: str, out: Path) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 640}, base_url=base)
            page.goto("/console/")
            page.get_by_label("API token").fill(token)
            page.get_by_role("button", name="Sign in").click()
            page.locator("#tokens-body tr").nth(5).wait_for()
            page.evaluate("document.getElementById('status').textContent = ''")
            page.mouse.move(0, 0)
            page.screenshot(path=str(out / "console-list.png"))

            page.set_viewport_size({"width": 1280, "height": 860})
            page.get_by_role("button", name="Create API Key").click()
            dialog = page.get_by_role("dialog", name="Create API Key")
            dialog.get_by_label("Name").fill("Loyalty Sync")
            dialog.get_by_label("pass:read").check()
            dialog.get_by_label("loyalty:manage").check()
            expires = (datetime.now(UTC) + timedelta(days=180)).date().isoformat()
            dialog.get_by_label("Expires on").fill(expires)
            dialog.get_by_label("Requests allowed").fill("1000")
            dialog.get_by_label("Period").select_option("3600s")
            dialog.get_by_label("Name").focus()
            page.screenshot(path=str(out / "console-create.png"))
            dialog.get_by_role("button", name="Cancel").click()

            page.set_viewport_size({"width": 1280, "height": 640})
            page.get_by_role("button", name="Rotate POS Integration").click()
            rotate = page.get_by_role("dialog", name="Rotate API key")
            rotate.get_by_label("1 day").focus()
            page.screenshot(path=str(out / "console-rotate.png"))
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        config = Config(
            grpc_port=0, database_url=f"sqlite:///{tmp}/tokens.db", bcrypt_rounds=4,
            rest_enabled=False, last_used_flush_seconds=0.2, shutdown_grace_seconds=1.0,
        )
        server = TokenServer(config)
        port = server.start()
        rest = RestServer(f"127.0.0.1:{port}", "127.0.0.1", 0)
        rest.start()
        try:
            base = f"http://127.0.0.1:{rest.port}"
            token = seed(server, base)
            time.sleep(0.5)  # lastUsedAt is written in batches
            photograph(base, token, args.out)
        finally:
            rest.stop(grace=1)
            server.stop(grace=1)
    pictures = (args.out / f"console-{name}.png" for name in ("list", "create", "rotate"))
    print("wrote", ", ".join(map(str, pictures)))


if __name__ == "__main__":
    main()
