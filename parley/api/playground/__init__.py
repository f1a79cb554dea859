"""The browser playground: `GET /` serves a chat page made of the three files in static/ (HTML,
CSS, plain JavaScript; no build step, nothing fetched from elsewhere, so it works offline).

The page is only a client of the public API (chat, /info, /v1/models, /metrics), called from the
browser with the key the user typed when the server has `--api-key`. So the page itself is open
(`PAGE_PATHS`, for GET only: TGI's `POST /` keeps wanting the key), and everything it reads is not.
`--no-playground` leaves these routes out: `GET /` is then a 405 again, as before the playground.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response

STATIC = files(__package__) / "static"
# path -> (file in static/, media type)
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/playground/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/playground/style.css": ("style.css", "text/css; charset=utf-8"),
}
PAGE_PATHS = frozenset(ASSETS)
# The page runs only its own script and talks only to this server; model output is inserted as text,
# and the CSP makes sure nothing it holds could run or load anything.
HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",  # revalidate, so an upgraded server's page is never mixed with an old script
}

router = APIRouter(include_in_schema=False)


def _route(name: str, media_type: str):
    body = (STATIC / name).read_bytes()

    async def asset() -> Response:
        return Response(body, media_type=media_type, headers=HEADERS)

    return asset


for _path, (_name, _media_type) in ASSETS.items():
    router.add_api_route(_path, _route(_name, _media_type), methods=["GET"])
