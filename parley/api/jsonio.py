"""JSON in and out: request bodies parsed strictly, responses and SSE frames written compactly.

Request bodies are read as RFC 8259 JSON with Unicode text, as orjson reads them: NaN and Infinity
(which Python's json takes) and lone UTF-16 surrogates ("\\ud800", valid JSON escapes that stand for
no character: the tokenizer failed on them with a 500) are a 422, the surrogate with the field that
holds it.
"""

from __future__ import annotations

import json
import re

import orjson
from fastapi import Request, Response

_SURROGATE = re.compile("[\ud800-\udfff]")


def dumps(obj) -> bytes:
    return orjson.dumps(obj)


class JSONBody(Response):
    media_type = "application/json"

    def render(self, content) -> bytes:
        return dumps(content)


class StrictJSONRequest(Request):
    async def json(self):
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                # FastAPI answers a JSONDecodeError with a 422 carrying its message
                raise json.JSONDecodeError(_explain(body) or exc.msg, exc.doc, exc.pos) from None
        return self._json


def _explain(body: bytes) -> str | None:
    """Where a body that Python's json reads but orjson refuses holds a lone surrogate."""
    try:
        found = _find_surrogate(json.loads(body, parse_constant=_refuse), [])
    except (ValueError, RecursionError):  # not JSON to Python either, or nested past its stack
        return None
    if found is None:
        return None
    path, text, at = found
    return (f"`{'.'.join(map(str, path)) or 'body'}` holds a lone UTF-16 surrogate (\\u{ord(text[at]):04x} at "
            f"character {at}), which is no Unicode character")


def _refuse(constant: str):
    raise ValueError(constant)


def _find_surrogate(value, path: list) -> tuple[list, str, int] | None:
    if isinstance(value, str):
        match = _SURROGATE.search(value)
        return (path, value, match.start()) if match else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and (match := _SURROGATE.search(key)):
            return path + [key], key, match.start()
        found = _find_surrogate(item, path + [key])
        if found:
            return found
    return None
