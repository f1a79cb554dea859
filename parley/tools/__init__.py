"""Tool calling in each model family's own format (`format.py`: the table, detected from the chat
template), or, for chat templates that know nothing of tools, in the default format described in
the system prompt: a grammar keeps the calls well-formed, and a parser reads them back."""

from parley.tools.format import DEFAULT_FORMAT, FORMATS, ToolFormat, detect_format
from parley.tools.grammar import tool_call_grammar
from parley.tools.parser import (
    ContentDelta,
    OutputEvents,
    ReasoningDelta,
    StreamEvent,
    ToolCallArgumentsDelta,
    ToolCallStart,
    ToolCallStreamParser,
    parse_tool_calls,
)
from parley.tools.prompt import DEFAULT_TOOL_PROMPT, tool_system_prompt
from parley.tools.validation import MAX_TOOLS, ToolChoice, ToolSpecError, validate_tools

__all__ = [
    "DEFAULT_FORMAT",
    "DEFAULT_TOOL_PROMPT",
    "FORMATS",
    "MAX_TOOLS",
    "ContentDelta",
    "OutputEvents",
    "ReasoningDelta",
    "StreamEvent",
    "ToolCallArgumentsDelta",
    "ToolCallStart",
    "ToolCallStreamParser",
    "ToolChoice",
    "ToolFormat",
    "ToolSpecError",
    "detect_format",
    "parse_tool_calls",
    "tool_call_grammar",
    "tool_system_prompt",
    "validate_tools",
]
