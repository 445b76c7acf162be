"""The browsable API reference at /docs, in headless Chromium against a real shim.

Like the console's tests: Debian's Chromium driven by Playwright, skipped without
the browser except under CI=true, where they fail.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest
from rest_helpers import Rest, running_rest

from tokenservice_server.console import SECURITY_HEADERS

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but the browser tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def database_url(sqlite_database_url: str) -> str:
    """SQLite only: the page reads the OpenAPI document, not the store."""
    return sqlite_database_url


@pytest.fixture
def rest(ts) -> Iterator[Rest]:
    with running_rest(ts.target) as running:
        yield running


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


def test_docs_are_served_from_the_package_under_the_strict_policy(rest: Rest) -> None:
    r = rest.client.get("/docs")
    assert r.status_code == 308 and r.headers["location"] == "/docs/"
    page = rest.client.get("/docs/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    for name, value in SECURITY_HEADERS.items():
        assert page.headers[name] == value
    html = page.text
    # No inline code, and nothing from another origin.
    assert re.findall(r"<script\b[^>]*>", html) == [
        '<script src="swagger-ui-bundle.js">', '<script src="docs.js">'
    ]
    assert not re.search(r"\son[a-z]+\s*=|\sstyle\s*=|<style", html)
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    bundle = rest.client.get("/docs/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and "SwaggerUIBundle" in bundle.text
    assert bundle.headers["content-type"] == "text/javascript; charset=utf-8"
    assert rest.client.get("/docs/swagger-ui.css").headers["content-type"].startswith("text/css")
    for missing in ("/docs/nope.js", "/docs/../pyproject.toml", "/docs/swagger-ui.js.map"):
        assert rest.client.get(missing).status_code == 404, missing
    assert rest.client.post("/docs/").status_code == 405
    assert rest.client.get("/docsx").status_code == 404  # only /docs and below


def test_the_page_shows_every_operation_of_the_openapi_document(
    rest: Rest, browser
) -> None:
    spec = rest.client.get("/openapi.json").json()
    expected = {
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    }
    context = browser.new_context(base_url=rest.base_url)
    context.set_default_timeout(15_000)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda msg: problems.append(msg.text)
            if "Content Security Policy" in msg.text or msg.type == "error" else None)
    outside: list[str] = []
    page.on("request", lambda req: outside.append(req.url)
            if not req.url.startswith(rest.base_url) and not req.url.startswith("data:")
            else None)
    try:
        page.goto("/docs/")
        page.locator(".opblock").first.wait_for()
        page.get_by_text(spec["info"]["title"], exact=False).first.wait_for()
        shown = set()
        for block in page.locator(".opblock-summary").all():
            method = block.locator(".opblock-summary-method").inner_text().strip()
            path = block.locator(".opblock-summary-path").get_attribute("data-path")
            shown.add((method, path))
        assert shown == expected

        # An operation opens to its parameters and responses, rendered from the document.
        create = page.locator(".opblock-post", has=page.locator(
            '.opblock-summary-path[data-path="/api/v1/api-tokens"]'))
        create.locator(".opblock-summary").click()
        create.locator(".responses-wrapper").wait_for()
        assert "201" in create.locator(".responses-wrapper").inner_text()
    finally:
        context.close()
    assert problems == []
    assert outside == []
