"""The one tool-call output format, shared by the prompt, the grammar and the parser (Hermes-style):

    optional text content<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>
    <tool_call>{"name": "get_time", "arguments": {}}</tool_call>

Calls come after any text content, one per line, and nothing follows the last one. The JSON is
written the way Python's `json.dumps` writes it, the spelling models have seen most.
"""

from __future__ import annotations

import secrets

from parley.types import CallFormat

CALL_START = "<tool_call>"
CALL_END = "</tool_call>"
CALL_SEPARATOR = "\n"
CALL_FORMAT = CallFormat(CALL_START, CALL_END, CALL_SEPARATOR)  # tells the engine where calls are

# llguidance JSON options ("x-guidance"): exactly ", " and ": " between items, no other whitespace,
# so the model cannot wander off into whitespace.
JSON_STYLE = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)
