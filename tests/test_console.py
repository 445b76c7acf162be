"""The web console driven in headless Chromium against a real tokenservice and shim.

Chromium is Debian's (`/usr/bin/chromium`, installed by .ci/run), driven by
Playwright's Python package; Playwright's own browser download is not used.
Without the browser these tests skip, except under CI=true, where they fail.
The browser tests run on SQLite only: the console sees the store through the
REST API, whose behaviour on PostgreSQL the other suites cover.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rest_helpers import Rest, bearer_header, running_rest

from tokenservice_server.console import SECURITY_HEADERS
from tokenservice_server.db import connection
from tokenservice_server.models import ApiToken

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ROOT = Path(__file__).resolve().parents[1]
SIGN_IN_SCOPES = ("api_token:manage", "pass:read", "invoice.view")
RATE, STATE = 6, 7  # the Rate limit and State cells of a row, after its name


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but the browser tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def database_url(sqlite_database_url: str) -> str:
    """SQLite only: overrides conftest's SQLite-and-PostgreSQL parametrisation."""
    return sqlite_database_url


@pytest.fixture
def rest(ts) -> Iterator[Rest]:
    with running_rest(ts.target) as running:
        yield running


@pytest.fixture
def manager(ts) -> str:
    """A token holding api_token:manage, pass:read and invoice.view (not pass:create,
    which its user holds)."""
    return ts.manager(scopes=SIGN_IN_SCOPES)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        _unavailable(f"{CHROMIUM} is missing (apt-get install chromium chromium-driver)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright Python package is not installed")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, rest: Rest):
    """A fresh browser context (its own storage) on the console; fails the test on a
    script error or a Content-Security-Policy violation."""
    context = browser.new_context(
        base_url=rest.base_url, viewport={"width": 1280, "height": 900},
        permissions=["clipboard-read", "clipboard-write"],
    )
    context.set_default_timeout(10_000)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on(
        "console",
        lambda msg: problems.append(msg.text) if "Content Security Policy" in msg.text else None,
    )
    page.goto("/console/")
    yield page
    context.close()
    assert problems == []


def sign_in(page, token: str) -> None:
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name="API Keys").wait_for()
    page.locator("#tokens-body tr").first.wait_for()


def row(page, name: str):
    return page.locator("#tokens-body tr", has=page.get_by_role("rowheader", name=name))


def api_tokens(rest: Rest, token: str) -> list[dict]:
    r = rest.client.get("/api/v1/api-tokens", headers=bearer_header(token))
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def by_id(rest: Rest, token: str) -> dict[str, dict]:
    return {t["id"]: t for t in api_tokens(rest, token)}


def works(rest: Rest, raw: str) -> bool:
    r = rest.client.post("/api/v1/authenticate", json={"token": raw})
    assert r.status_code in (200, 401), r.text
    return r.status_code == 200


def focused(locator) -> bool:
    return locator.evaluate("el => el === document.activeElement")


# -- serving ------------------------------------------------------------------


def test_console_is_served_with_security_headers_and_no_inline_code(rest: Rest) -> None:
    r = rest.client.get("/console")
    assert r.status_code == 308 and r.headers["location"] == "/console/"
    page = rest.client.get("/console/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    for name, value in SECURITY_HEADERS.items():
        assert page.headers[name] == value
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "unsafe-inline" not in page.headers["content-security-policy"]
    # The policy allows no inline code, so the page must have none; and nothing
    # may come from another origin (machines may have no internet).
    html = page.text
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="console.js" defer>']
    assert not re.search(r"\son[a-z]+\s*=|\sstyle\s*=|<style", html)
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    js = rest.client.get("/console/console.js")
    assert js.headers["content-type"] == "text/javascript; charset=utf-8"
    assert not re.search(r"localStorage\s*[.\[]|document\.cookie|indexedDB\.", js.text)
    css = rest.client.get("/console/console.css")
    assert css.headers["content-type"] == "text/css; charset=utf-8" and "@import" not in css.text
    assert rest.client.get("/console/index.html").text == html
    for missing in ("/console/nope.js", "/console/../pyproject.toml", "/console/static/index.html"):
        assert rest.client.get(missing).status_code == 404, missing
    r = rest.client.post("/console/")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
    # The API around it is unchanged.
    assert rest.client.get("/consoles").status_code == 404
    assert rest.client.get("/api/v1/scopes").status_code == 200


# -- signing in ---------------------------------------------------------------


def test_sign_in_says_who_you_are_and_keeps_the_token_in_session_storage_only(
    ts, page, manager: str
) -> None:
    token_field = page.get_by_label("API token")
    error = page.locator("#signin-token-error")

    page.get_by_role("button", name="Sign in").click()
    assert error.inner_text() == "Paste an API token to sign in."

    token_field.fill("tks_not_a_real_token")
    page.get_by_role("button", name="Sign in").click()
    error.filter(has_text="was not accepted").wait_for()
    assert token_field.get_attribute("aria-invalid") == "true"
    assert token_field.evaluate("el => el === document.activeElement")

    ts.add_user("reader@acme.test", permissions=("pass:read",))
    reader = ts.mint("reader@acme.test", scopes=("pass:read",))
    token_field.fill(reader)
    page.get_by_role("button", name="Sign in").click()
    error.filter(has_text="does not hold the api_token:manage scope").wait_for()
    assert page.evaluate("sessionStorage.length") == 0

    sign_in(page, manager)
    assert page.locator("#who-email").inner_text() == "manager@acme.test"
    assert page.locator("#who-org").inner_text() == "acme"
    page.locator("#keys-view summary").click()  # opens the session's details
    assert page.locator("#session-scopes li").all_inner_texts() == list(SIGN_IN_SCOPES)
    page.get_by_role("status").filter(has_text="Signed in as manager@acme.test.").wait_for()
    assert row(page, "bootstrap this session").count() == 1

    storage = page.evaluate(
        "({session: Object.values(sessionStorage), local: localStorage.length,"
        " cookie: document.cookie})"
    )
    assert storage == {"session": [manager], "local": 0, "cookie": ""}
    assert page.context.cookies() == []
    assert manager not in page.url

    page.reload()  # the same tab keeps its session
    page.get_by_role("heading", name="API Keys").wait_for()

    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("heading", name="Sign in to the console").wait_for()
    assert page.evaluate("sessionStorage.length") == 0
    assert token_field.evaluate("el => el === document.activeElement")

    other_tab = page.context.new_page()  # sessionStorage is per tab: a new tab starts signed out
    other_tab.goto("/console/")
    other_tab.get_by_role("heading", name="Sign in to the console").wait_for()


def test_a_revoked_sign_in_token_sends_you_back_to_sign_in_with_the_reason(
    rest: Rest, page, manager: str
) -> None:
    sign_in(page, manager)
    me = rest.client.post("/api/v1/authenticate", json={"token": manager}).json()["tokenId"]
    r = rest.client.delete(f"/api/v1/api-tokens/{me}", headers=bearer_header(manager))
    assert r.status_code == 200, r.text

    page.get_by_role("button", name="Refresh").click()
    alert = page.locator("#signin-alert")
    alert.wait_for()
    assert "no longer accepted" in alert.inner_text()
    assert "expired or been revoked" in alert.inner_text()
    assert page.locator("#keys-view").is_hidden()
    assert page.evaluate("sessionStorage.length") == 0

    page.reload()  # nothing is left to sign in with
    page.get_by_role("heading", name="Sign in to the console").wait_for()


# -- creating -----------------------------------------------------------------


def test_create_with_scopes_and_expiry_shows_the_token_once(
    rest: Rest, page, manager: str
) -> None:
    sign_in(page, manager)
    create = page.get_by_role("button", name="Create API Key")
    create.focus()
    page.keyboard.press("Enter")  # keyboard all the way
    dialog = page.get_by_role("dialog", name="Create API Key")
    dialog.wait_for()
    assert page.get_by_label("Name").evaluate("el => el === document.activeElement")

    # Only what the sign-in token holds is offered, not everything its user holds.
    offered = dialog.locator("input[type=checkbox]").evaluate_all("els => els.map(e => e.value)")
    assert offered == list(SIGN_IN_SCOPES)

    page.keyboard.type("POS Integration")
    dialog.get_by_label("pass:read").check()
    dialog.get_by_label("invoice.view").check()
    dialog.get_by_label("Expires on").fill("2099-12-31")
    dialog.get_by_role("button", name="Create").click()

    token_field = dialog.get_by_label("Token for POS Integration")
    token_field.wait_for()
    raw = token_field.input_value()
    assert raw.startswith("tks_")
    assert "It will not be shown again" in dialog.inner_text()
    copy = dialog.get_by_role("button", name="Copy")
    assert copy.evaluate("el => el === document.activeElement")
    copy.click()
    dialog.get_by_text("Copied to the clipboard.").wait_for()
    assert page.evaluate("navigator.clipboard.readText()") == raw

    # What the console created is what the API holds.
    who = rest.client.post("/api/v1/authenticate", json={"token": raw}).json()
    assert who["scopes"] == ["pass:read", "invoice.view"]
    assert who["expiresAt"] == "2099-12-31T23:59:59Z"
    assert [t["name"] for t in api_tokens(rest, manager)] == ["POS Integration", "bootstrap"]

    dialog.get_by_role("button", name="Done").click()
    assert dialog.is_hidden()
    assert create.evaluate("el => el === document.activeElement")
    assert raw not in page.content()
    assert page.locator("#created-token").input_value() == ""

    new_row = row(page, "POS Integration")
    new_row.wait_for()
    cells = new_row.locator("td").all_inner_texts()
    assert cells[0] == raw[:12] + "…"
    assert cells[1].split() == ["pass:read", "invoice.view"]
    assert cells[5].split() == ["2099-12-31", "23:59", "UTC"]  # expires
    assert cells[RATE] == "default"
    assert cells[STATE] == "Active"

    page.reload()
    row(page, "POS Integration").wait_for()
    assert raw not in page.content()
    assert raw not in page.evaluate("JSON.stringify(Object.values(sessionStorage))")


def test_validation_errors_appear_beside_their_fields(rest: Rest, page, manager: str) -> None:
    sign_in(page, manager)
    page.get_by_role("button", name="Create API Key").click()
    dialog = page.get_by_role("dialog", name="Create API Key")

    dialog.get_by_role("button", name="Create").click()  # no name, no scope
    name_error = dialog.locator("#create-name-error")
    name_error.wait_for()
    assert name_error.inner_text() == "Name is required."
    assert "scope" in dialog.locator("#create-scopes-error").inner_text()
    assert dialog.locator("#create-expires-error").is_hidden()
    name = dialog.get_by_label("Name")
    assert name.get_attribute("aria-invalid") == "true"
    assert name.evaluate("el => el === document.activeElement")
    described = name.get_attribute("aria-describedby").split()
    assert "create-name-error" in described

    name.fill("Sync Service")
    dialog.get_by_label("pass:read").check()
    dialog.get_by_label("Expires on").fill("2001-01-01")  # the API refuses the past
    dialog.get_by_role("button", name="Create").click()
    expires_error = dialog.locator("#create-expires-error")
    expires_error.wait_for()
    assert "future" in expires_error.inner_text()
    assert name_error.is_hidden() and name.get_attribute("aria-invalid") is None
    assert dialog.get_by_label("Expires on").evaluate("el => el === document.activeElement")

    assert [t["name"] for t in api_tokens(rest, manager)] == ["bootstrap"]

    page.keyboard.press("Escape")  # closes; focus goes back to the button that opened it
    assert dialog.is_hidden()
    assert page.get_by_role("button", name="Create API Key").evaluate(
        "el => el === document.activeElement"
    )


# -- revoking -----------------------------------------------------------------


def test_revoke_asks_for_confirmation_then_revokes(rest: Rest, page, manager: str) -> None:
    created = rest.create(manager, name="Old Sync", scopes=["pass:read"]).json()
    rest.create(manager, name="Keeper", scopes=["pass:read"])
    sign_in(page, manager)

    revoke = page.get_by_role("button", name="Revoke Old Sync")
    revoke.click()
    confirm = page.get_by_role("dialog", name="Revoke API key?")
    confirm.wait_for()
    assert "Old Sync" in confirm.inner_text()
    assert created["token"][:12] in confirm.inner_text()
    confirm.get_by_text("It has not minted any API keys.").wait_for()
    assert confirm.get_by_role("checkbox").is_hidden()
    cancel = confirm.get_by_role("button", name="Cancel")
    assert cancel.evaluate("el => el === document.activeElement")  # the safe choice first
    cancel.click()
    assert revoke.evaluate("el => el === document.activeElement")
    assert rest.client.post("/api/v1/authenticate", json={"token": created["token"]}).is_success

    revoke.click()
    confirm.get_by_role("button", name="Revoke").click()
    page.get_by_role("status").filter(has_text="API key Old Sync revoked.").wait_for()
    old = row(page, "Old Sync")
    assert old.locator("td").nth(STATE).inner_text().split()[0] == "Revoked"
    assert old.get_by_role("button").count() == 0
    assert old.get_by_role("rowheader").evaluate("el => el === document.activeElement")
    assert row(page, "Keeper").get_by_role("button", name="Revoke Keeper").is_visible()

    r = rest.client.post("/api/v1/authenticate", json={"token": created["token"]})
    assert r.status_code == 401
    listed = {t["name"]: t["revokedAt"] for t in api_tokens(rest, manager)}
    assert listed["Old Sync"] is not None and listed["Keeper"] is None

    page.reload()
    assert row(page, "Old Sync").locator("td").nth(STATE).inner_text().split()[0] == "Revoked"


def test_revoking_your_own_sign_in_token_signs_you_out(page, manager: str) -> None:
    sign_in(page, manager)
    page.get_by_role("button", name="Revoke bootstrap").click()
    page.get_by_role("dialog").get_by_role("button", name="Revoke").click()
    alert = page.locator("#signin-alert")
    alert.wait_for()
    assert "the token you signed in with" in alert.inner_text()
    assert page.evaluate("sessionStorage.length") == 0


# -- the list -----------------------------------------------------------------


def test_org_admins_see_every_token_of_their_org_only(ts, rest: Rest, page) -> None:
    admin = ts.manager(
        email="admin@acme.test", permissions=("api_token:manage", "api_token:admin", "pass:read")
    )
    colleague = ts.manager(email="colleague@acme.test")
    rest.create(colleague, name="Colleague's key")
    stranger = ts.manager(email="someone@globex.test", org="globex")
    rest.create(stranger, name="Globex key")

    sign_in(page, admin)
    page.get_by_text("You hold api_token:admin").wait_for()
    theirs = row(page, "Colleague's key")
    theirs.wait_for()
    assert theirs.locator("td").nth(2).inner_text() == "colleague@acme.test"  # Created by
    assert page.get_by_role("columnheader", name="Created by").is_visible()
    assert row(page, "Globex key").count() == 0
    # An admin revokes a colleague's key but cannot rotate it (the API would refuse:
    # a rotation hands over a working secret); their own keys they rotate.
    assert theirs.get_by_role("button", name="Revoke Colleague's key").count() == 1
    assert theirs.get_by_role("button", name="Rotate Colleague's key").count() == 0
    mine, colleagues = (row(page, "bootstrap").filter(has_text=f"{who}@acme.test")
                        for who in ("admin", "colleague"))
    assert mine.get_by_role("button", name="Rotate bootstrap").count() == 1
    assert colleagues.get_by_role("button", name="Rotate bootstrap").count() == 0

    # A plain manager sees only their own tokens, and no Created by column.
    page.get_by_role("button", name="Sign out").click()
    sign_in(page, colleague)
    names = page.locator("#tokens-body .name-text").all_inner_texts()
    assert names == ["Colleague's key", "bootstrap"]
    assert page.get_by_role("columnheader", name="Created by").is_hidden()


def test_long_lists_load_more_by_page_token(ts, page, manager: str) -> None:
    for i in range(24):
        ts.mint("manager@acme.test", scopes=("pass:read",), name=f"key {i:02}")
    expiring = datetime.now(UTC) + timedelta(seconds=2)
    ts.mint("manager@acme.test", scopes=("pass:read",), name="short-lived", expires_at=expiring)
    sign_in(page, manager)
    body = page.locator("#tokens-body tr")
    assert body.count() == 20
    more = page.get_by_role("button", name="Load more")
    more.click()
    page.locator("#tokens-body tr:nth-child(26)").wait_for()
    assert body.count() == 26
    assert more.is_hidden()
    names = page.locator("#tokens-body .name-text").all_inner_texts()
    assert len(set(names)) == 26 and names[-1] == "bootstrap"
    # The first new row takes the focus, so keyboard users continue where they were.
    assert page.locator("#tokens-body tr:nth-child(21) th").evaluate(
        "el => el === document.activeElement"
    )
    page.wait_for_timeout(2_100)
    page.get_by_role("button", name="Refresh").click()
    page.get_by_role("status").filter(has_text="refreshed").wait_for()
    assert row(page, "short-lived").locator("td").nth(STATE).inner_text() == "Expired"


def test_api_failures_are_shown_in_words(rest: Rest, page, manager: str) -> None:
    sign_in(page, manager)
    rest.server.stop(grace=1)  # the service goes away
    page.get_by_role("button", name="Refresh").click()
    alert = page.locator("#list-alert")
    alert.wait_for()
    assert "Could not load API keys." in alert.inner_text()
    assert "Could not reach tokenservice" in alert.inner_text()
    assert page.get_by_role("heading", name="API Keys").is_visible()  # still signed in


# -- screenshots ----------------------------------------------------------------


def test_screenshot_script_makes_both_pictures(tmp_path: Path, browser) -> None:
    """docs/screenshots.py keeps working, so the README's pictures can be redone."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "screenshots.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    for name in ("console-list.png", "console-create.png", "console-rotate.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000


def test_expiry_is_sent_as_the_end_of_the_day_in_utc(rest: Rest, page, manager: str) -> None:
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    sign_in(page, manager)
    page.get_by_role("button", name="Create API Key").click()
    dialog = page.get_by_role("dialog", name="Create API Key")
    dialog.get_by_label("Name").fill("Tomorrow")
    dialog.get_by_label("pass:read").check()
    dialog.get_by_label("Expires on").fill(tomorrow)
    with page.expect_request("**/api/v1/api-tokens") as request:
        dialog.get_by_role("button", name="Create").click()
    assert request.value.post_data_json == {
        "name": "Tomorrow", "scopes": ["pass:read"], "expiresAt": f"{tomorrow}T23:59:59Z",
    }
    assert request.value.headers["authorization"] == f"Bearer {manager}"
    assert "?" not in request.value.url
    dialog.get_by_label("Token for Tomorrow").wait_for()


# -- rotating -----------------------------------------------------------------


def test_rotate_shows_the_new_secret_once_and_the_old_token_changes(
    rest: Rest, page, manager: str
) -> None:
    old = rest.create(manager, name="Deploy Bot",
                      rateLimit={"requests": 100, "period": "60s"}).json()
    old_id = old["apiToken"]["id"]
    sign_in(page, manager)
    rotate = page.get_by_role("button", name="Rotate Deploy Bot")
    rotate.click()
    dialog = page.get_by_role("dialog", name="Rotate API key")
    dialog.wait_for()
    assert old["token"][:12] in dialog.inner_text()
    assert focused(dialog.get_by_label("1 day")) and dialog.get_by_label("1 day").is_checked()
    dialog.get_by_label("1 hour").check()
    with page.expect_request("**/api/v1/api-tokens/*:rotate") as request:
        dialog.get_by_role("button", name="Rotate").click()
    assert request.value.post_data_json == {"gracePeriod": "3600s"}

    # The new secret, in the same shown-once panel Create uses.
    token_field = dialog.get_by_label("Token for Deploy Bot")
    token_field.wait_for()
    raw = token_field.input_value()
    assert raw.startswith("tks_") and raw != old["token"]
    assert "It will not be shown again" in dialog.inner_text()
    assert "API key rotated" in dialog.inner_text()
    assert f"The old token {old['token'][:12]}… keeps working until" in dialog.inner_text()
    copy = dialog.get_by_role("button", name="Copy")
    assert focused(copy)
    copy.click()
    dialog.get_by_text("Copied to the clipboard.").wait_for()
    assert page.evaluate("navigator.clipboard.readText()") == raw

    # Both work during the grace; the API links them and ends the old one in an hour.
    assert works(rest, raw) and works(rest, old["token"])
    listed = by_id(rest, manager)
    new_id = listed[old_id]["replacedById"]
    assert listed[new_id]["rotatedFromId"] == old_id
    grace_end = datetime.fromisoformat(listed[old_id]["expiresAt"])
    assert timedelta(minutes=59) < grace_end - datetime.now(UTC) <= timedelta(hours=1)

    dialog.get_by_role("button", name="Done").click()
    assert dialog.is_hidden()
    assert raw not in page.content() and page.locator("#created-token").input_value() == ""

    # The list was refreshed: the new key first, the old one with its new expiry.
    new_row = page.locator(f'#tokens-body tr[data-id="{new_id}"]')
    new_row.wait_for()
    old_row = page.locator(f'#tokens-body tr[data-id="{old_id}"]')
    assert page.locator("#tokens-body .name-text").all_inner_texts()[:2] == [
        "Deploy Bot", "Deploy Bot"]
    new_cells = new_row.locator("td").all_inner_texts()
    assert new_cells[0] == raw[:12] + "…"
    assert new_cells[RATE] == "100 per minute"  # inherited
    assert new_cells[STATE].split() == ["Active", "Replaces", old["token"][:12] + "…"]
    old_cells = old_row.locator("td").all_inner_texts()
    assert old_cells[5].split() == [
        grace_end.strftime("%Y-%m-%d"), grace_end.strftime("%H:%M"), "UTC"]
    assert old_cells[STATE].split() == ["Active", "Replaced", "by", raw[:12] + "…"]
    # A replaced token cannot be rotated or edited again, only revoked.
    assert old_row.get_by_role("button").all_inner_texts() == ["Revoke"]
    # Focus returns to the rotated key's row, whose Rotate button is gone.
    assert focused(old_row.get_by_role("rowheader"))

    page.reload()
    new_row.wait_for()
    assert raw not in page.content()


def test_rotating_the_sign_in_token_with_no_grace_keeps_the_console_signed_in(
    rest: Rest, page, manager: str
) -> None:
    sign_in(page, manager)
    page.get_by_role("button", name="Rotate bootstrap").click()
    dialog = page.get_by_role("dialog", name="Rotate API key")
    dialog.get_by_label("No time: revoke it now").check()
    dialog.get_by_role("button", name="Rotate").click()
    token_field = dialog.get_by_label("Token for bootstrap")
    token_field.wait_for()
    raw = token_field.input_value()
    text = dialog.inner_text()
    assert "is revoked: it no longer works" in text
    assert "This console now uses the new token." in text

    # The old sign-in token is dead at once; the console carries on with the new one,
    # and the list it refreshed with it shows the old one revoked.
    assert not works(rest, manager) and works(rest, raw)
    assert page.evaluate("Object.values(sessionStorage)") == [raw]
    page.locator("#tokens-body tr").nth(1).wait_for()
    rows = page.locator("#tokens-body tr")
    assert rows.nth(0).get_by_role("rowheader").inner_text().split() == [
        "bootstrap", "this", "session"]
    assert rows.nth(1).locator("td").nth(STATE).inner_text().split()[0] == "Revoked"
    dialog.get_by_role("button", name="Done").click()

    page.reload()  # the tab's session holds the new token
    page.get_by_role("heading", name="API Keys").wait_for()
    assert page.locator("#session-prefix").inner_text() == "token " + raw[:12] + "…"


def test_conflicts_from_a_stale_list_are_shown_in_words(rest: Rest, page, manager: str) -> None:
    made = rest.create(manager, name="Stale").json()
    sign_in(page, manager)
    # Revoked behind the console's back: its list still offers Rotate and Edit.
    r = rest.client.delete(f"/api/v1/api-tokens/{made['apiToken']['id']}",
                           headers=bearer_header(manager))
    assert r.status_code == 200

    page.get_by_role("button", name="Rotate Stale").click()
    dialog = page.get_by_role("dialog", name="Rotate API key")
    dialog.get_by_role("button", name="Rotate").click()
    alert = dialog.locator("#rotate-alert")
    alert.wait_for()
    assert alert.inner_text() == (
        "The API key was not rotated. Not possible in the API key's current state: "
        "only an active token can be rotated; this one is revoked. "
        "Refresh the list to see where it stands.")
    assert dialog.get_by_label("Token for Stale").is_hidden()
    dialog.get_by_role("button", name="Cancel").click()

    page.get_by_role("button", name="Edit Stale").click()
    edit = page.get_by_role("dialog", name="Edit API key")
    edit.get_by_label("Name").fill("Stale, renamed")
    edit.get_by_role("button", name="Save changes").click()
    alert = edit.locator("#create-alert")
    alert.wait_for()
    assert "The changes were not saved." in alert.inner_text()
    assert "a revoked token cannot be changed" in alert.inner_text()
    assert [t["name"] for t in api_tokens(rest, manager)] == ["Stale", "bootstrap"]


# -- the filters ----------------------------------------------------------------


def test_unused_filter_hides_a_key_used_just_now_and_pages_with_its_filters(
    ts, rest: Rest, page, manager: str
) -> None:
    for i in range(21):
        ts.mint("manager@acme.test", scopes=("pass:read",), name=f"idle {i:02}")
    busy = rest.create(manager, name="Busy").json()
    assert works(rest, busy["token"])
    gone = rest.create(manager, name="Gone").json()
    rest.client.delete(f"/api/v1/api-tokens/{gone['apiToken']['id']}",
                       headers=bearer_header(manager))
    ts.server.usage.flush()  # lastUsedAt is written in batches
    sign_in(page, manager)
    assert row(page, "Busy").count() == 1

    with page.expect_request("**/api/v1/api-tokens?*") as first:
        page.get_by_label("Unused for 90 days").check()
    page.get_by_role("status").filter(has_text="matching API keys").wait_for()
    query = first.value.url.split("?", 1)[1]
    since = re.search(r"notUsedSince=([^&]+)", query).group(1).replace("%3A", ":")
    cutoff = datetime.fromisoformat(since)
    assert timedelta(days=90) <= datetime.now(UTC) - cutoff < timedelta(days=90, minutes=1)
    names = page.locator("#tokens-body .name-text").all_inner_texts()
    assert len(names) == 20 and "Busy" not in names and "Gone" in names

    # The next page asks with the very same filters, so the API accepts its page token;
    # a second later, a cutoff worked out afresh would differ (and be refused).
    page.wait_for_timeout(1_100)
    with page.expect_request("**/api/v1/api-tokens?*pageToken=*") as more:
        page.get_by_role("button", name="Load more").click()
    assert f"notUsedSince={first.value.url.split('notUsedSince=')[1].split('&')[0]}" in (
        more.value.url)
    page.get_by_role("status").filter(has_text="more API keys").wait_for()
    names = page.locator("#tokens-body .name-text").all_inner_texts()
    assert {f"idle {i:02}" for i in range(21)} <= set(names) and "Busy" not in names
    assert page.locator("#list-alert").is_hidden()

    # The state filter composes with it.
    page.get_by_label("State").select_option("REVOKED")
    page.locator("#tokens-body tr").nth(1).wait_for(state="detached")
    assert page.locator("#tokens-body .name-text").all_inner_texts() == ["Gone"]
    assert row(page, "Gone").locator("td").nth(STATE).inner_text().split()[0] == "Revoked"
    page.get_by_label("State").select_option("EXPIRED")
    page.get_by_text("No API keys match these filters.").wait_for()

    page.get_by_label("State").select_option("")
    page.get_by_label("Unused for 90 days").uncheck()
    row(page, "Busy").wait_for()


# -- revoking with children -----------------------------------------------------


def test_the_revoke_dialog_counts_minted_keys_and_can_revoke_them_too(
    ts, rest: Rest, page, manager: str
) -> None:
    manage = ["api_token:manage", "pass:read"]
    parent = rest.create(manager, name="Old bootstrap", scopes=manage).json()
    child = rest.create(parent["token"], name="Child", scopes=manage).json()
    grandchild = rest.create(child["token"], name="Grandchild").json()
    retired = rest.create(parent["token"], name="Retired child").json()
    rest.client.delete(f"/api/v1/api-tokens/{retired['apiToken']['id']}",
                       headers=bearer_header(manager))
    sibling = rest.create(manager, name="Sibling").json()
    # The parent expired (as an old bootstrap token does); its children still work.
    with connection(ts.server.store.db):
        ApiToken.update(expires_at=datetime.now(UTC) - timedelta(minutes=1)).where(
            ApiToken.id == uuid.UUID(parent["apiToken"]["id"])).execute()
    sign_in(page, manager)

    # Filtered to expired keys, the children are not on screen: they are counted anyway.
    page.get_by_label("State").select_option("EXPIRED")
    page.locator("#tokens-body tr").nth(1).wait_for(state="detached")
    assert page.locator("#tokens-body .name-text").all_inner_texts() == ["Old bootstrap"]
    page.get_by_role("button", name="Revoke Old bootstrap").click()
    dialog = page.get_by_role("dialog", name="Revoke API key?")
    dialog.get_by_text("It minted 3 API keys").wait_for()
    assert "; 2 of them are not revoked." in dialog.inner_text()
    also = dialog.get_by_label("Also revoke the 2 API keys it minted")
    assert not also.is_checked()
    also.check()
    with page.expect_request("**/api/v1/api-tokens/*") as request:
        dialog.get_by_role("button", name="Revoke").click()
    assert request.value.method == "DELETE"
    assert request.value.url.endswith("?revokeChildren=true")
    page.get_by_role("status").filter(
        has_text="API key Old bootstrap revoked, with the 2 API keys it minted.").wait_for()

    # The API agrees: the subtree is revoked, the sibling and the sign-in token are not.
    assert not works(rest, child["token"]) and not works(rest, grandchild["token"])
    assert works(rest, sibling["token"]) and works(rest, manager)
    states = {t["name"]: t["state"] for t in api_tokens(rest, manager)}
    assert states == {"Sibling": "ACTIVE", "Retired child": "REVOKED", "Grandchild": "REVOKED",
                      "Child": "REVOKED", "Old bootstrap": "REVOKED", "bootstrap": "ACTIVE"}
    page.get_by_label("State").select_option("")
    row(page, "Grandchild").wait_for()
    assert row(page, "Grandchild").locator("td").nth(STATE).inner_text().split()[0] == "Revoked"


def test_a_plain_revoke_leaves_the_minted_keys_alone(rest: Rest, page, manager: str) -> None:
    parent = rest.create(manager, name="Parent", scopes=["api_token:manage", "pass:read"]).json()
    child = rest.create(parent["token"], name="Child").json()
    sign_in(page, manager)
    page.get_by_role("button", name="Revoke Parent").click()
    dialog = page.get_by_role("dialog", name="Revoke API key?")
    dialog.get_by_text("It minted 1 API key, directly or through keys they minted.").wait_for()
    dialog.get_by_role("button", name="Revoke").click()
    page.get_by_role("status").filter(has_text="API key Parent revoked.").wait_for()
    assert not works(rest, parent["token"]) and works(rest, child["token"])


# -- rate limits and editing ----------------------------------------------------


def test_create_with_a_rate_limit_shows_it_and_edit_sends_only_what_changed(
    rest: Rest, page, manager: str
) -> None:
    sign_in(page, manager)
    page.get_by_role("button", name="Create API Key").click()
    dialog = page.get_by_role("dialog", name="Create API Key")
    dialog.get_by_label("Name").fill("Metered")
    dialog.get_by_label("pass:read").check()
    requests = dialog.get_by_label("Requests allowed")
    requests.fill("0")  # the API refuses it, beside the field
    dialog.get_by_role("button", name="Create").click()
    error = dialog.locator("#create-rate-error")
    error.wait_for()
    assert error.inner_text() == "The rate limit must be more than zero."
    assert requests.get_attribute("aria-invalid") == "true" and focused(requests)

    requests.fill("600")
    assert dialog.get_by_label("Period").input_value() == "60s"  # per minute unless chosen
    with page.expect_request("**/api/v1/api-tokens") as request:
        dialog.get_by_role("button", name="Create").click()
    assert request.value.post_data_json == {
        "name": "Metered", "scopes": ["pass:read"],
        "rateLimit": {"requests": 600, "period": "60s"}}
    dialog.get_by_label("Token for Metered").wait_for()
    dialog.get_by_role("button", name="Done").click()
    metered = row(page, "Metered")
    metered.wait_for()
    assert metered.locator("td").nth(RATE).inner_text() == "600 per minute"
    assert row(page, "bootstrap").locator("td").nth(RATE).inner_text() == "default"
    listed = {t["name"]: t for t in api_tokens(rest, manager)}
    assert listed["Metered"]["rateLimit"] == {"requests": 600, "period": "60s"}

    # Edit: the form comes filled in, and PATCH carries only the changed keys.
    edit_button = page.get_by_role("button", name="Edit Metered")
    edit_button.click()
    edit = page.get_by_role("dialog", name="Edit API key")
    assert edit.get_by_label("Name").input_value() == "Metered"
    assert edit.get_by_label("pass:read").is_checked()
    assert edit.get_by_label("Requests allowed").input_value() == "600"
    edit.get_by_label("Requests allowed").fill("20")
    edit.get_by_label("Period").select_option("3600s")
    with page.expect_request("**/api/v1/api-tokens/*") as request:
        edit.get_by_role("button", name="Save changes").click()
    assert request.value.method == "PATCH"
    assert request.value.post_data_json == {"rateLimit": {"requests": 20, "period": "3600s"}}
    page.get_by_role("status").filter(has_text="API key Metered saved.").wait_for()
    assert metered.locator("td").nth(RATE).inner_text() == "20 per hour"
    assert focused(page.get_by_role("button", name="Edit Metered"))

    page.get_by_role("button", name="Edit Metered").click()
    edit.get_by_label("Name").fill("Unmetered")
    edit.get_by_label("Requests allowed").fill("")  # back to the service default
    with page.expect_request("**/api/v1/api-tokens/*") as request:
        edit.get_by_role("button", name="Save changes").click()
    assert request.value.post_data_json == {"name": "Unmetered", "rateLimit": None}
    unmetered = row(page, "Unmetered")
    unmetered.wait_for()
    assert unmetered.locator("td").nth(RATE).inner_text() == "default"
    listed = {t["name"]: t for t in api_tokens(rest, manager)}
    assert listed["Unmetered"]["rateLimit"] is None
    assert "Metered" not in listed
