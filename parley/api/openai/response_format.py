"""`response_format`, in every dialect's shape (SDK-WIRE §1.4), as the engine's `Grammar`.

    "text" | {"type": "text"}                                  free text (also null)
    "json_object" | {"type": "json_object"}                    any JSON object (Azure sends the bare string)
    {"type": "json_object", "value": S}                        JSON matching schema S (huggingface_hub's json_schema;
                                                               "schema" instead of "value" also works, as Together's)
    {"type": "json_schema", "json_schema": {"schema": S, ...}} OpenAI, Azure, Mistral; `name` optional (Friendli);
                                                               `strict: true` closes S's objects (tools/validation.py)
    {"type": "json", "value": S}                               TGI
    {"type": "regex", "value": P} | {"type": "regex", "schema": P}   TGI | Friendli

vLLM's fields for the same, as its users send them (extra_body), each the alternative to the others:
    "structured_outputs": {"json": S} | {"regex": P} | {"choice": [..]} | {"grammar": G} | {"json_object": true}
    "guided_json": S, "guided_regex": P, "guided_choice": [..], "guided_grammar": G   (vLLM before 0.11)
A choice is exactly one of its strings; a grammar is Lark's syntax as llguidance reads it.

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


GRAMMAR_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                  "guided_grammar")


def body_grammar(body) -> Grammar | None:
    """The grammar a chat or completions body asks for, through whichever one of GRAMMAR_FIELDS it
    gives; None for free text."""
    grammars = {name: grammar for name in GRAMMAR_FIELDS
                if (grammar := _grammar_of(name, getattr(body, name, None))) is not None}
    require(len(grammars) <= 1, f"Input validation error: {' and '.join(f'`{name}`' for name in grammars)} each "
            "constrain the output: give one", list(grammars)[-1] if grammars else "")
    return next(iter(grammars.values()), None)


def grammar_field(body) -> str:
    """The field of GRAMMAR_FIELDS that `body` gives (with structured_outputs, its key), for the
    engine's errors about the grammar; response_format when none."""
    for name in GRAMMAR_FIELDS[1:]:
        value = getattr(body, name, None)
        if value is not None:
            return f"{name}.{next(iter(_given(value)), '')}".rstrip(".") if name == "structured_outputs" else name
    return "response_format"


def _given(outputs) -> dict[str, Any]:
    """structured_outputs' keys given (null ones count as absent), as the client spells them."""
    return {field.alias or name: getattr(outputs, name) for name, field in type(outputs).model_fields.items()
            if getattr(outputs, name) is not None}


def _grammar_of(name: str, value: Any) -> Grammar | None:
    if value is None:
        return None
    if name == "response_format":
        return response_grammar(value)
    if name == "structured_outputs":
        given = _given(value)
        require(len(given) == 1, "Input validation error: `structured_outputs` takes exactly one of json, regex, "
                f"choice, grammar, json_object; given: {', '.join(given) or 'none'}", "structured_outputs")
        ((key, value),) = given.items()
        return _vllm_grammar(key, value, f"structured_outputs.{key}")
    return _vllm_grammar(name.removeprefix("guided_"), value, name)


def _vllm_grammar(kind: str, value: Any, field: str) -> Grammar | None:
    """vLLM's json, regex, choice, grammar or json_object, given as `field`."""
    if kind == "json":
        return _json_grammar(value, field)
    if kind == "regex":
        return Grammar("regex", value)
    if kind == "choice":  # each choice a Lark string literal, with JSON's escapes
        return Grammar("lark", "start: " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in value))
    if kind == "grammar":
        return Grammar("lark", value)
    return Grammar("json_object") if value else None


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
