"""The one tool-call output format, shared by the prompt, the grammar and the parser (Hermes-style):

    optional text content<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>
    <tool_call>{"name":"get_time","arguments":{}}</tool_call>

Calls come after any text content, one per line, and nothing follows the last one. The JSON is
compact, without whitespace (Python's `json.dumps` with `separators=(",", ":")`): with ", " and
": " a call took 5 more of SmolLM2's tokens, and nearly twice as many forced answers were cut
short by `max_tokens` (75 against 40 of 200, see docs/API.md).
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from parley.types import CallFormat

CALL_START = "<tool_call>"
CALL_END = "</tool_call>"
CALL_SEPARATOR = "\n"
CALL_FORMAT = CallFormat(CALL_START, CALL_END, CALL_SEPARATOR)  # tells the engine where calls are

# llguidance JSON options ("x-guidance"): exactly "," and ":" between items, no whitespace, so the
# model cannot wander off into whitespace.
JSON_STYLE = {"item_separator": ",", "key_separator": ":", "whitespace_flexible": False}


def call_text(name: Any, arguments: Any) -> str:
    """One call as the format writes it (for the prompt's history)."""
    call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False, separators=(",", ":"))
    return CALL_START + call + CALL_END


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)
