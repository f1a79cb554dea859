"""Fast compact JSON for responses and SSE frames (orjson when installed)."""

from __future__ import annotations

import json

from starlette.responses import Response

try:
    import orjson

    def dumps(obj) -> bytes:
        return orjson.dumps(obj)

except ImportError:  # pragma: no cover - orjson is optional

    def dumps(obj) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class JSONBody(Response):
    media_type = "application/json"

    def render(self, content) -> bytes:
        return dumps(content)
