"""Tool definitions rendered as text for the system prompt, for chat templates that ignore tools
(they get the default format, `format.DEFAULT_FORMAT`).

The caller appends the returned text to the system message (or makes it the system message).
Like TGI's `tool_prompt`, a request may replace the instructions; the definitions, one JSON
object per line, always follow them.
"""

from __future__ import annotations

import json
from typing import Any

from parley.tools.format import DEFAULT_FORMAT
from parley.tools.validation import ToolChoice

_CALLS = DEFAULT_FORMAT.calls
DEFAULT_TOOL_PROMPT = (
    "You can call the functions defined below. To call one, write "
    f'{_CALLS.start}{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}{_CALLS.end}'
    " with arguments that follow the function's parameter schema. Put each call on its own line"
    " after any text, and write nothing after the last call. Answer in plain text when no function"
    " is needed. Functions:"
)


def tool_system_prompt(
    tools: list[dict[str, Any]], tool_choice: ToolChoice = "auto", tool_prompt: str | None = None
) -> str | None:
    """The text describing `tools` to the model, or None when none should be shown."""
    if tool_choice == "none" or not tools:
        return None
    definitions = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
    return f"{DEFAULT_TOOL_PROMPT if tool_prompt is None else tool_prompt}\n{definitions}"
