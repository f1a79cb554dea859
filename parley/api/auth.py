"""`--api-key`: every route but /health wants `Authorization: Bearer KEY` (TGI, all SDKs),
`api-key: KEY` (Azure sends both) or `x-api-key: KEY` (Anthropic's). A pure ASGI middleware, so streaming and disconnect detection
pass through untouched.

`open_pages` are paths anyone may GET without the key: the playground's page and its two files
(parley/api/playground), which ask the user for the key and send it on every API call they make.
Only GET and HEAD: `POST /` is TGI's generation route and wants the key as before."""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from parley.api.errors import ApiError, error_response

OPEN_PATHS = frozenset({"/health"})


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, api_key: str, open_pages: frozenset[str] = frozenset()):
        self.app = app
        self._key = api_key.encode()
        self._open_pages = open_pages

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._open(scope) or self._authorized(Headers(scope=scope)):
            await self.app(scope, receive, send)
            return
        err = ApiError(401, "Unauthorized: missing or invalid API key", "authentication")
        await error_response(scope["path"], err, {"www-authenticate": "Bearer"})(scope, receive, send)

    def _open(self, scope: Scope) -> bool:
        path = scope["path"]
        return path in OPEN_PATHS or (path in self._open_pages and scope["method"] in ("GET", "HEAD"))

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        candidates = [headers.get("api-key", ""), headers.get("x-api-key", "")]
        if scheme.lower() == "bearer":
            candidates.append(token.strip())
        return any(hmac.compare_digest(c.encode(), self._key) for c in candidates if c)
