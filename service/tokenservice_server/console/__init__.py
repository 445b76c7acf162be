"""The web console (Settings → API Keys): static files the REST shim serves at /console/.

The page is plain HTML, CSS and JavaScript that talks only to the public REST
API, so everything it does passes the same checks as any other caller. The
files are read once from the package (`console/static/`, shipped as package
data) and served from memory: a fixed set of names, so no path from a request
ever reaches the file system.

- `is_console_path(path)`: whether the shim should hand a request to the console.
- `app`: the ASGI app serving `/console` (a redirect to `/console/`) and `/console/*`.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

PREFIX = "/console"

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}

# The page loads nothing but its own files and talks only to its own origin;
# no inline script or style is allowed, so injected markup cannot run.
# form-action 'none': forms are submitted by script, never as a navigation
# that would put a pasted token into a URL.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",
}


def is_console_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def _load_files() -> dict[str, tuple[bytes, str]]:
    """name -> (content, content type) for every file in console/static/."""
    files: dict[str, tuple[bytes, str]] = {}
    for entry in (resources.files(__name__) / "static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in _CONTENT_TYPES:
            files[entry.name] = (entry.read_bytes(), _CONTENT_TYPES[suffix])
    return files


class ConsoleApp:
    """ASGI app for /console and everything under it."""

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
            name = path[len(PREFIX) + 1 :] or "index.html"
            found = self.files.get(name)
            if found is None:
                response = PlainTextResponse("Not Found", status_code=404)
            else:
                content, media_type = found
                response = Response(content, media_type=media_type)
        response.headers.update(SECURITY_HEADERS)
        return response

    async def __call__(self, scope, receive, send) -> None:
        request = Request(scope, receive)
        await self.response(request)(scope, receive, send)


__all__ = ["PREFIX", "SECURITY_HEADERS", "ConsoleApp", "app", "is_console_path"]

_app: ConsoleApp | None = None


async def app(scope, receive, send) -> None:
    """The console as a plain ASGI callable, for the REST shim to hand requests to."""
    global _app
    if _app is None:
        _app = ConsoleApp()
    await _app(scope, receive, send)
