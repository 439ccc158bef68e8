"""The operator dashboard at /dashboard: a static page, read once at start-up, whose script reads the JSON API."""

from __future__ import annotations

from importlib.resources import files

from litestar import Response, Router, get
from litestar.params import FromPath

from protocol.errors import NotFound

__all__ = ["ASSETS", "CSP", "dashboard_router"]

# the page loads nothing but its own files and talks to nothing but this gateway
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
ASSETS = {  # file name -> content type
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",  # revalidated, so an upgraded gateway serves its own script
}


def _load() -> dict[str, bytes]:
    folder = files("gateway") / "dashboard"
    return {name: (folder / name).read_bytes() for name in ASSETS}


def dashboard_router(middleware: list | None = None) -> Router:
    """GET /dashboard and its assets. No guard: the page holds no data, its script sends the operator's key."""
    loaded = _load()  # once, when the app is built: no file I/O on the event loop

    def respond(name: str) -> Response:
        return Response(loaded[name], media_type=ASSETS[name], headers=_HEADERS)

    @get("/", summary="The operator dashboard", include_in_schema=False)
    async def page() -> Response:
        return respond("index.html")

    @get("/{name:str}", summary="The dashboard's script, style sheet and icon", include_in_schema=False)
    async def asset(name: FromPath[str]) -> Response:
        if name not in loaded:
            raise NotFound(f"The dashboard has no file '{name}'.")
        return respond(name)

    return Router(path="/dashboard", route_handlers=[page, asset], middleware=middleware or [])
