"""Tool calling for chat templates that know nothing of tools: the tools are described in the system
prompt, a grammar keeps the calls well-formed, and a parser reads them back (format in `format.py`)."""

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
    "DEFAULT_TOOL_PROMPT",
    "MAX_TOOLS",
    "ContentDelta",
    "OutputEvents",
    "ReasoningDelta",
    "StreamEvent",
    "ToolCallArgumentsDelta",
    "ToolCallStart",
    "ToolCallStreamParser",
    "ToolChoice",
    "ToolSpecError",
    "parse_tool_calls",
    "tool_call_grammar",
    "tool_system_prompt",
    "validate_tools",
]
