"""The browsable API reference at /docs: Swagger UI rendering /openapi.json, no CDN.

Swagger UI's files come from the `swagger-ui-bundle-v2` package (swagger-ui-dist
repackaged for Python); the page around them and the script that starts Swagger
UI are ours, so the page needs no inline code and is served under the web
console's Content-Security-Policy. Like the console, the files are read once
and served from memory by a fixed set of names: no path from a request ever
reaches the file system.

- `is_docs_path(path)`: whether the shim should hand a request to this app.
- `app`: the ASGI app serving `/docs` (a redirect to `/docs/`) and `/docs/*`.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import Receive, Scope, Send

from ..console import SECURITY_HEADERS

PREFIX = "/docs"

# Swagger UI's own files this page uses (not the source maps or the ES builds).
_VENDOR_FILES = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
}

_INDEX = b"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>tokenservice API reference</title>
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <link rel="stylesheet" href="swagger-ui.css">
  <link rel="icon" type="image/png" href="favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="swagger-ui-bundle.js"></script>
  <script src="docs.js"></script>
</body>
</html>
"""

# validatorUrl null: Swagger UI would otherwise send the document to an online
# validator. "Try it out" calls this same origin, which the policy allows.
_INIT_JS = b"""// Starts Swagger UI on this service's own OpenAPI document.
"use strict";
window.addEventListener("DOMContentLoaded", function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
"""


def is_docs_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def _load_files() -> dict[str, tuple[bytes, str]]:
    """name -> (content, content type): ours, and Swagger UI's from its package."""
    from swagger_ui_bundle import swagger_ui_path

    files = {
        "index.html": (_INDEX, "text/html; charset=utf-8"),
        "docs.js": (_INIT_JS, "text/javascript; charset=utf-8"),
    }
    for name, media_type in _VENDOR_FILES.items():
        files[name] = ((swagger_ui_path / name).read_bytes(), media_type)
    return files


class DocsApp:
    """ASGI app for /docs and everything under it."""

    def __init__(self) -> None:
        self.files = _load_files()

    def response(self, request: Request) -> Response:
        path = request.url.path
        if request.method not in ("GET", "HEAD"):
            response: Response = PlainTextResponse(
                "Method Not Allowed", status_code=405, headers={"Allow": "GET, HEAD"}
            )
        elif path == PREFIX:
            response = RedirectResponse(PREFIX + "/", status_code=308)
        else:
            found = self.files.get(path[len(PREFIX) + 1 :] or "index.html")
            if found is None:
                response = PlainTextResponse("Not Found", status_code=404)
            else:
                content, media_type = found
                response = Response(content, media_type=media_type)
        response.headers.update(SECURITY_HEADERS)
        return response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.response(Request(scope, receive))(scope, receive, send)


_app: DocsApp | None = None


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The reference as a plain ASGI callable; the files are read on first use."""
    global _app
    if _app is None:
        _app = DocsApp()
    await _app(scope, receive, send)


__all__ = ["PREFIX", "DocsApp", "app", "is_docs_path"]
