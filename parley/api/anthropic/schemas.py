"""Anthropic's Messages API request bodies, as the anthropic SDK sends them.

The request is checked whole: a top-level field Parley does not know is refused by name (400, as
on every route, errors.refuse_unknown_fields); inside messages, tools and tool_choice a field or
block type it does not know is a 400 naming where it is (images, documents, redacted thinking...).
`cache_control` (on the request or a block) is accepted: prompts that share a prefix share its KV
cache anyway, always. `output_config.format` is structured output, as `response_format` on chat.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cache_control: dict[str, Any] | None = None


class TextBlock(Strict):
    type: Literal["text"]
    text: str


class ToolUseBlock(Strict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(Strict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool | None = None  # the template sees the content after "Error: "


class ThinkingBlock(Strict):
    """An earlier answer's thinking, sent back: the chat template gets it as that turn's
    `reasoning_content`. The signature is Anthropic's own: Parley writes an empty one and reads none."""

    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock, Field(discriminator="type")]


class Message(Strict):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(Strict):
    name: str
    description: str | None = None
    input_schema: dict[str, Any]


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


class CountTokensRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stream: bool | None = False
    cache_control: dict[str, Any] | None = None
    output_config: OutputConfig | None = None
