"""The web page at `GET /`: one HTML file, its stylesheet and script, served from the package.

The page is a client of the public API (`GET /models`, `POST /classify`) and nothing else: no
build step, no template, nothing fetched from another host, so it works on an offline machine.
The Content-Security-Policy below tells the browser so (scripts, styles, images and requests
from this origin only; previews are `blob:` URLs).

These are ordinary Starlette routes behind the middleware stack. POST /classify keeps the
ServiceApp shortcut in front of all of it, so the page costs the fast path nothing.
`ISOMAX_PAGE=false` leaves them out (then `GET /` is 404).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
INDEX = "index.html"

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob: data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on every load, so a new release of the page is seen at once.
    "Cache-Control": "no-cache",
}


def add_page(app: FastAPI) -> None:
    """Register `GET /` (the page) and `/static/*` (its CSS, JS and icon) on `app`."""
    html = (STATIC_DIR / INDEX).read_bytes()  # read once: a missing file fails start-up

    async def page(request: Request) -> Response:
        return Response(html, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    app.add_route("/", page, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
