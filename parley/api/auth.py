"""`--api-key`: every route but /health wants `Authorization: Bearer KEY` (TGI, all SDKs),
`api-key: KEY` (Azure sends both) or `x-api-key: KEY` (Anthropic's). A pure ASGI middleware, so streaming and disconnect detection
pass through untouched."""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from parley.api.errors import ApiError, error_response

OPEN_PATHS = frozenset({"/health"})


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(Headers(scope=scope)):
            await self.app(scope, receive, send)
            return
        err = ApiError(401, "Unauthorized: missing or invalid API key", "authentication")
        await error_response(scope["path"], err, {"www-authenticate": "Bearer"})(scope, receive, send)

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        candidates = [headers.get("api-key", ""), headers.get("x-api-key", "")]
        if scheme.lower() == "bearer":
            candidates.append(token.strip())
        return any(hmac.compare_digest(c.encode(), self._key) for c in candidates if c)
