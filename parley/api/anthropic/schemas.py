"""Anthropic's Messages API request bodies, as the anthropic SDK sends them.

The request is checked whole: a field Parley does not know is refused by name, at the top or
inside messages, content blocks, tools, tool_choice, thinking and output_config (400 naming it as
sent, `messages.0.content.1.NAME`: errors.refuse_unknown_fields; `--unknown-fields ignore` lets it
through); a block type it does not know is a 400 naming where it is (images, documents, redacted
thinking...). What the SDK sends back of an earlier answer is known: `citations` (empty only),
`cache_control`, a thinking block's `signature`, a tool_use's `caller` when the model called it.
`output_config.format` is structured output, as `response_format` on chat.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from parley.api.openai.schemas import Citations, EndUser


class Strict(BaseModel):
    """Fields no schema here declares are kept only to be refused by name (errors.unknown_fields)."""

    model_config = ConfigDict(extra="allow")


class CacheControl(Strict):
    """A cache breakpoint: keep the prompt's KV cache up to here for later requests. Parley's prefix
    cache does that for every prompt, always: each full block of KV is kept under the hash of the
    tokens up to it, and a later prompt that starts the same reuses it (engine/block_manager.py),
    until the memory is needed; so a breakpoint asks for nothing more, and the answer is the same
    with or without it. `ttl` is how long Anthropic bills the cache for: here blocks stay while the
    memory allows."""

    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class Cached(Strict):
    """What Anthropic lets carry a cache breakpoint (blocks but thinking, tools, the request)."""

    cache_control: CacheControl | None = None


class TextBlock(Cached):
    type: Literal["text"]
    text: str
    citations: Citations = None  # the SDK echoes an earlier answer's (null when it had none)


class DirectCaller(Strict):
    """Who made a tool call: the model itself, as every call Parley's models make (not one of
    Anthropic's server tools, such as code execution)."""

    type: Literal["direct"]


class ToolUseBlock(Cached):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    caller: DirectCaller | None = None


class ToolResultBlock(Cached):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool | None = None  # the template sees the content after "Error: "


class ThinkingBlock(Strict):
    """An earlier answer's thinking, sent back: the chat template gets it as that turn's
    `reasoning_content`. The signature is Anthropic's proof that Claude wrote the thinking, so that
    Claude is never shown forged thinking as its own; Parley signs nothing (it writes an empty one)
    and takes any thinking it is sent, so there is nothing to check it against."""

    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock, Field(discriminator="type")]


class Message(Strict):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(Cached):
    type: Literal["custom"] | None = None  # a tool the client runs: every tool Parley takes
    name: str
    description: str | None = None
    input_schema: dict[str, Any]
    strict: bool | None = Field(None, description="true: the call's input holds no property the schema does not "
                                "name, as `strict` on chat (the grammar closes its objects)")


class ToolChoice(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class JSONFormat(Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Strict):
    format: JSONFormat | None = None


class ThinkingConfig(Strict):
    """enabled: a thinking model thinks at most `budget_tokens`; disabled: it does not think;
    adaptive: as much as it likes. A model that does not think refuses enabled and adaptive."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1024)
    display: Literal["summarized"] | None = Field(None, description="the thinking comes back (whole: Parley does not "
                                                 "summarize it); omitted, which leaves it out, is not supported")


class CountTokensRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    cache_control: CacheControl | None = None


class Metadata(Strict):
    user_id: EndUser | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    metadata: Metadata | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stream: bool | None = False
    output_config: OutputConfig | None = None
