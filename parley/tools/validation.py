"""Checks on the tools and tool_choice of a request, before anything is built from them, and JSON
Schemas in OpenAI's strict mode (`strict: true` on a function or a json_schema response format):
every object is closed, so an answer holds no property the schema does not name. OpenAI refuses a
strict schema with an object left open; Parley closes the objects that say nothing
(`additionalProperties` absent) and refuses the ones that open themselves, naming where."""

from __future__ import annotations

import re
from typing import Any

MAX_TOOLS = 128
NAME_PATTERN = re.compile(r"[a-zA-Z0-9_-]{1,64}")
TOOL_CHOICE_MODES = ("none", "auto", "required")

# "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
ToolChoice = str | dict[str, Any]


class ToolSpecError(ValueError):
    """`field` (e.g. "tools[2].function.name") breaks a rule; the message starts with it."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


def validate_tools(tools: list[dict[str, Any]], tool_choice: ToolChoice = "auto") -> None:
    """Raise `ToolSpecError` naming the first offending field of OpenAI-style `tools`/`tool_choice`."""
    if not isinstance(tools, list):
        raise ToolSpecError("tools", "must be a list")
    if len(tools) > MAX_TOOLS:
        raise ToolSpecError("tools", f"at most {MAX_TOOLS} tools are allowed, got {len(tools)}")
    names = [_validate_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ToolSpecError(f"tools[{i}].function.name", f"duplicate function name {name!r}")
    _validate_tool_choice(tool_choice, names)


def function_name(tool_choice: ToolChoice) -> str | None:
    """The function a named tool_choice forces, None for the string modes."""
    return tool_choice["function"]["name"] if isinstance(tool_choice, dict) else None


def _validate_tool(tool: Any, field: str) -> str:
    if not isinstance(tool, dict):
        raise ToolSpecError(field, "must be an object")
    if tool.get("type", "function") != "function":
        raise ToolSpecError(f"{field}.type", f"must be 'function', got {tool['type']!r}")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise ToolSpecError(f"{field}.function", "must be an object")
    name = function.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ToolSpecError(
            f"{field}.function.name", f"must match ^{NAME_PATTERN.pattern}$, got {name!r}"
        )
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise ToolSpecError(f"{field}.function.description", "must be a string")
    parameters = function.get("parameters")
    if parameters is not None:
        if not isinstance(parameters, dict):
            raise ToolSpecError(f"{field}.function.parameters", "must be a JSON Schema object")
        if parameters.get("type", "object") != "object":
            raise ToolSpecError(
                f"{field}.function.parameters.type", f"must be 'object', got {parameters['type']!r}"
            )
        if function.get("strict") is True:
            strict_schema(parameters, f"{field}.function.parameters")
    return name


def _validate_tool_choice(tool_choice: Any, names: list[str]) -> None:
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICE_MODES:
            raise ToolSpecError(
                "tool_choice",
                f"must be one of {', '.join(TOOL_CHOICE_MODES)} or a function, got {tool_choice!r}",
            )
        if tool_choice == "required" and not names:
            raise ToolSpecError("tool_choice", "'required' needs at least one tool")
        return
    if not isinstance(tool_choice, dict) or tool_choice.get("type", "function") != "function":
        raise ToolSpecError(
            "tool_choice", 'must be a string or {"type": "function", "function": {"name": ...}}'
        )
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if name not in names:
        raise ToolSpecError("tool_choice.function.name", f"no tool is named {name!r}")


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMAS = ("items", "contains", "not", "if", "then", "else", "propertyNames")


def strict_schema(schema: Any, field: str) -> Any:
    """A copy of `schema` with every object schema closed; ToolSpecError naming the first object
    under `field` that sets additionalProperties to anything but false."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    types = schema.get("type")
    is_object = types == "object" or (isinstance(types, list) and "object" in types) or "properties" in schema
    if is_object:
        if "additionalProperties" not in schema:
            out["additionalProperties"] = False
        elif schema["additionalProperties"] is not False:
            raise ToolSpecError(f"{field}.additionalProperties", "must be false in strict mode (or left out)")
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            out[key] = {name: strict_schema(sub, f"{field}.{key}.{name}") for name, sub in schema[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            out[key] = [strict_schema(sub, f"{field}.{key}[{i}]") for i, sub in enumerate(schema[key])]
    for key in _SCHEMAS:
        if key in schema:
            out[key] = strict_schema(schema[key], f"{field}.{key}")
    return out
