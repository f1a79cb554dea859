"""`response_format`, in every dialect's shape (SDK-WIRE §1.4), as the engine's `Grammar`.

    "text" | {"type": "text"}                                  free text (also null)
    "json_object" | {"type": "json_object"}                    any JSON object (Azure sends the bare string)
    {"type": "json_object", "value": S}                        JSON matching schema S (huggingface_hub's json_schema;
                                                               "schema" instead of "value" also works, as Together's)
    {"type": "json_schema", "json_schema": {"schema": S, ...}} OpenAI, Azure, Mistral; `name` optional (Friendli);
                                                               `strict: true` closes S's objects (tools/validation.py)
    {"type": "json", "value": S}                               TGI
    {"type": "regex", "value": P} | {"type": "regex", "schema": P}   TGI | Friendli

A schema may be an object or its JSON text. Whether the engine can enforce it is the engine's call:
it answers a ValidationError about `grammar`, which the routes rename for the client (errors.fields_named).
"""

from __future__ import annotations

import json
from typing import Any

from parley.api.errors import require, validation_error
from parley.tools.validation import ToolSpecError, strict_schema
from parley.types import Grammar

FORMAT_TYPES = ("text", "json_object", "json_schema", "json", "regex")


def response_grammar(response_format: dict[str, Any] | str | None) -> Grammar | None:
    """The grammar `response_format` asks for; None for free text."""
    if response_format is None:
        return None
    if isinstance(response_format, str):
        response_format = {"type": response_format}
    kind = response_format.get("type")
    require(kind in FORMAT_TYPES, f"Input validation error: `response_format.type` must be one of "
            f"{', '.join(FORMAT_TYPES)}. Given: {kind!r}", "response_format.type")
    if kind == "text":
        return None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        require(isinstance(spec, dict), "Input validation error: `response_format.json_schema` must be an object "
                'holding the schema: {"schema": {...}}', "response_format.json_schema")
        field = "response_format.json_schema.schema"
        schema = spec.get("schema")
        if spec.get("strict") is True:
            schema = _strict(schema, field)
        return _json_grammar(schema, field)
    value = response_format.get("value", response_format.get("schema"))
    if kind == "regex":
        require(isinstance(value, str), "Input validation error: a regex `response_format` needs the pattern "
                "as a string in `value` (or `schema`)", "response_format.value")
        return Grammar("regex", value)
    require(kind == "json_object" or value is not None,
            "Input validation error: a json `response_format` needs the schema in `value`", "response_format.value")
    return _json_grammar(value, "response_format.value")


def _strict(schema: Any, field: str) -> Any:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            return schema  # the engine names what is wrong with it
    try:
        return strict_schema(schema, field)
    except ToolSpecError as exc:
        raise validation_error(f"Input validation error: {exc}", exc.field) from exc


def _json_grammar(schema: Any, field: str) -> Grammar:
    if schema is None:
        return Grammar("json_object")
    require(isinstance(schema, (dict, str)),
            f"Input validation error: `{field}` must be a JSON Schema (an object, or its JSON text)", field)
    return Grammar("json", schema if isinstance(schema, str) else json.dumps(schema))
