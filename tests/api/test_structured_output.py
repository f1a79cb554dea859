"""response_format on the real server (default SmolLM2 model), in every dialect's shape: whatever the
model samples, the output follows the schema or pattern; what the engine cannot enforce is a 422.

Strings and arrays in the schemas are bounded, so every output fits in MAX_TOKENS.
"""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import openai
import pytest
from huggingface_hub import InferenceClient
from openai import AsyncOpenAI, OpenAI

from server import CLIENT_TIMEOUT_S

pytestmark = pytest.mark.slow

MAX_TOKENS = 200  # the model likes newlines: JSON whitespace is allowed up to 32 characters per gap
SHORT = {"type": "string", "maxLength": 16}

SCHEMAS = {
    "flat_required": {
        "type": "object",
        "properties": {"name": SHORT, "age": {"type": "integer", "minimum": 0, "maximum": 130}},
        "required": ["name", "age"], "additionalProperties": False,
    },
    "nested_objects": {
        "type": "object",
        "properties": {"person": {
            "type": "object",
            "properties": {"name": SHORT, "address": {
                "type": "object",
                "properties": {"city": SHORT, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False,
            }},
            "required": ["name", "address"], "additionalProperties": False,
        }},
        "required": ["person"], "additionalProperties": False,
    },
    "array_bounds": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                     "minItems": 2, "maxItems": 4},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
             "additionalProperties": False},
    "optional_members": {
        "type": "object",
        "properties": {"a": SHORT, "b": {"type": "integer", "minimum": 0, "maximum": 9}, "c": {"type": "boolean"}},
        "additionalProperties": False,
    },
    "number_bounds": {
        "type": "object",
        "properties": {"score": {"type": "number", "minimum": 0.5, "maximum": 99.5}},
        "required": ["score"], "additionalProperties": False,
    },
    "integer_bounds": {"type": "integer", "minimum": -10, "maximum": 10},
    "exclusive_bounds": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 1000},
    "string_pattern": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
    "closed_object": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999}, "note": SHORT},
        "required": ["id", "note"], "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"sku": {"type": "string", "maxLength": 8}, "qty": {"type": "integer", "minimum": 1,
                                                                              "maximum": 50}},
            "required": ["sku", "qty"], "additionalProperties": False,
        },
        "minItems": 1, "maxItems": 3,
    },
    "booleans_and_null": {
        "type": "object", "properties": {"ok": {"type": "boolean"}, "nothing": {"type": "null"}},
        "required": ["ok", "nothing"], "additionalProperties": False,
    },
    "any_of": {
        "type": "object",
        "properties": {"v": {"anyOf": [SHORT, {"type": "integer", "minimum": 0, "maximum": 1000}]}},
        "required": ["v"], "additionalProperties": False,
    },
    "const": {
        "type": "object",
        "properties": {"kind": {"const": "event"}, "n": {"type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["kind", "n"], "additionalProperties": False,
    },
    "string_lengths": {"type": "string", "minLength": 3, "maxLength": 6},
    "matrix": {
        "type": "array",
        "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1,
                  "maxItems": 3},
        "minItems": 1, "maxItems": 3,
    },
    "refs": {
        "$defs": {"point": {"type": "object",
                            "properties": {"x": {"type": "integer", "minimum": -99, "maximum": 99},
                                           "y": {"type": "integer", "minimum": -99, "maximum": 99}},
                            "required": ["x", "y"], "additionalProperties": False}},
        "type": "object",
        "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
        "required": ["from", "to"], "additionalProperties": False,
    },
    "nullable_type_list": {
        "type": "object", "properties": {"v": {"type": ["string", "null"], "maxLength": 16}}, "required": ["v"],
        "additionalProperties": False,
    },
    "tuple": {
        "type": "array",
        "prefixItems": [{"type": "string", "maxLength": 5}, {"type": "integer", "minimum": 0, "maximum": 99},
                        {"type": "boolean"}],
        "items": False, "minItems": 3,
    },
    "formats": {
        "type": "object",
        "properties": {"day": {"type": "string", "format": "date"}, "id": {"type": "string", "format": "uuid"}},
        "required": ["day", "id"], "additionalProperties": False,
    },
}
# sampled like a typical user (temperature 1 lets a 135M model spin out a number digit after digit)
SAMPLING = {"greedy": {"temperature": 0}, "sampled": {"temperature": 0.7, "top_p": 0.9, "seed": 7}}


def prompt(name: str) -> list[dict]:
    return [{"role": "user", "content": f"Reply with JSON ({name.replace('_', ' ')})."}]


def validate(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())


@pytest.fixture
def oai(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=CLIENT_TIMEOUT_S)


@pytest.fixture(scope="module")
def schema_outputs(server) -> dict[tuple[str, str], tuple[str, str]]:
    """(schema, sampling) -> (content, finish_reason), all requested at once so the engine batches them."""

    async def run():
        async with AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=CLIENT_TIMEOUT_S) as client:
            async def one(name, mode):
                r = await client.chat.completions.create(
                    model="m", messages=prompt(name), max_tokens=MAX_TOKENS, **SAMPLING[mode],
                    response_format={"type": "json_schema",
                                     "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}})
                return (name, mode), (r.choices[0].message.content, r.choices[0].finish_reason)

            return dict(await asyncio.gather(*(one(name, mode) for name in SCHEMAS for mode in SAMPLING)))

    return asyncio.run(run())


@pytest.mark.parametrize("mode", SAMPLING)
@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema_output_validates(schema_outputs, name, mode):
    content, finish_reason = schema_outputs[name, mode]
    assert finish_reason == "stop", content
    validate(content, SCHEMAS[name])


SCHEMA = SCHEMAS["closed_object"]
SHAPES = {  # every dialect's way of asking for SCHEMA (SDK-WIRE §1.4)
    "openai": {"type": "json_schema", "json_schema": {"name": "note", "schema": SCHEMA, "strict": True}},
    "friendli_no_name": {"type": "json_schema", "json_schema": {"schema": SCHEMA}},
    "huggingface_hub": {"type": "json_object", "value": SCHEMA},
    "tgi": {"type": "json", "value": SCHEMA},
    "tgi_schema_text": {"type": "json", "value": json.dumps(SCHEMA)},
}


@pytest.mark.parametrize("shape", SHAPES)
def test_every_dialect_shape_constrains(http, shape):
    body = {"messages": prompt("a note"), "max_tokens": MAX_TOKENS, "temperature": 0,
            "response_format": SHAPES[shape]}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    validate(r.json()["choices"][0]["message"]["content"], SCHEMA)


@pytest.mark.parametrize("response_format", [{"type": "json_object"}, "json_object"])  # "json_object": Azure
def test_json_object_mode_gives_an_object(http, response_format):
    body = {"messages": [{"role": "user", "content": "Describe Paris as JSON."}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "response_format": response_format}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"]), dict)


@pytest.mark.parametrize("response_format", [{"type": "text"}, "text"])
def test_text_format_is_free(oai, response_format):
    plain = oai.chat.completions.create(model="m", messages=prompt("x"), max_tokens=8, temperature=0)
    r = oai.chat.completions.create(model="m", messages=prompt("x"), max_tokens=8, temperature=0,
                                    response_format=response_format)
    assert r.choices[0].message.content == plain.choices[0].message.content


PHONE = r"\(\d{3}\) \d{3}-\d{4}"


@pytest.mark.parametrize("response_format", [{"type": "regex", "value": PHONE}, {"type": "regex", "schema": PHONE}],
                         ids=["tgi", "friendli"])
@pytest.mark.parametrize("sampling", SAMPLING.values(), ids=SAMPLING)
def test_regex_output_fullmatches(oai, response_format, sampling):
    r = oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "Give me a phone number."}],
                                    max_tokens=MAX_TOKENS, response_format=response_format, **sampling)
    assert re.fullmatch(PHONE, r.choices[0].message.content) and r.choices[0].finish_reason == "stop"


def test_completions_route_takes_response_format(oai):
    r = oai.completions.create(model="m", prompt="Three primes as JSON:", max_tokens=MAX_TOKENS, temperature=0,
                               n=2, extra_body={"response_format": {"type": "json", "value": SCHEMAS["array_bounds"]}})
    for choice in r.choices:
        validate(choice.text, SCHEMAS["array_bounds"])


def test_streamed_output_validates(oai):
    stream = oai.chat.completions.create(model="m", messages=prompt("a note"), max_tokens=MAX_TOKENS, temperature=0,
                                         response_format=SHAPES["openai"], stream=True)
    chunks = list(stream)
    validate("".join(c.choices[0].delta.content or "" for c in chunks), SCHEMA)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens_cut_gives_a_valid_prefix(oai):
    kwargs = {"model": "m", "messages": prompt("nested objects"), "temperature": 0, "response_format": {
        "type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMAS["nested_objects"]}}}
    whole = oai.chat.completions.create(max_tokens=MAX_TOKENS, **kwargs).choices[0]
    cut = oai.chat.completions.create(max_tokens=6, **kwargs).choices[0]
    assert whole.finish_reason == "stop" and cut.finish_reason == "length"
    assert whole.message.content.startswith(cut.message.content) and cut.message.content


DIGIT_TOKENS = range(32, 42)  # "0" to "9" in SmolLM2's vocabulary
NUMBERS = {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "integer"}},
           "required": ["x", "y"], "additionalProperties": False}


def test_numbers_end_even_when_the_model_wants_digits(oai):
    """A model pushed to write nothing but digits (logit_bias) still ends its numbers at 17 digits
    before the exponent and 3 in it: the answer ends whole well before max_tokens."""
    r = oai.chat.completions.create(model="m", messages=prompt("two numbers"), max_tokens=100, temperature=1.0,
                                    seed=3, logit_bias={str(t): 100 for t in DIGIT_TOKENS},
                                    response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": NUMBERS}})
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert set(json.loads(choice.message.content)) == {"x", "y"}
    for mantissa, exponent in re.findall(r"([0-9.]+)(?:[eE][+-]?([0-9]+))?", choice.message.content):
        assert len(mantissa.replace(".", "")) <= 17 and len(exponent) <= 3, choice.message.content


def test_unsupported_keyword_is_a_422_naming_it(oai):
    with pytest.raises(openai.UnprocessableEntityError) as e:
        oai.chat.completions.create(model="m", messages=prompt("x"), max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "array", "uniqueItems": True}}})
    assert "uniqueItems" in e.value.message and e.value.body["param"] == "response_format"


def test_a_schema_too_costly_to_compile_is_a_422(oai, http):
    """800 bytes whose compilation would run for hours (an intersection of 30 unanchored patterns)
    are refused once the compile deadline passes, and the server goes on serving."""
    schema = {"type": "string", "allOf": [{"pattern": f"[a-z]*{chr(97 + i % 26)}{i}"} for i in range(30)]}
    with pytest.raises(openai.UnprocessableEntityError) as e:
        oai.chat.completions.create(model="m", messages=prompt("x"), max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    assert "too costly to compile" in e.value.message and e.value.body["param"] == "response_format"
    assert http.get("/health").status_code == 200


def test_a_deep_schema_does_not_crash_the_server(http):
    """A chain of 5,000 $refs (330 KB) overflowed the stack llguidance compiled it on: the server died.
    It compiles now; parsing it then passes llguidance's limit of 2,000 items in a row of the parse
    (5,000 nested choices), which ends the request with a 424 that says so."""
    defs = {f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}, {"type": "null"}]} for i in range(5000)}
    schema = {"$defs": {**defs, "d5000": {"type": "integer"}}, "$ref": "#/$defs/d0"}
    r = http.post("/v1/chat/completions", json={"messages": prompt("x"), "max_tokens": 5, "response_format": {
        "type": "json_schema", "json_schema": {"name": "deep", "schema": schema}}})
    assert r.status_code == 424 and "max is 2000" in r.json()["error"]["message"], r.text
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize("response_format, param", [
    ({"type": "yaml"}, "response_format.type"),
    ("xml", "response_format.type"),
    ({"type": "regex"}, "response_format.value"),
    ({"type": "json"}, "response_format.value"),
    ({"type": "json_schema", "json_schema": 5}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"schema": 5}}, "response_format.json_schema.schema"),
    ({"type": "json", "value": "{not json"}, "response_format"),
])
def test_malformed_response_format_is_a_422(http, response_format, param):
    r = http.post("/v1/chat/completions", json={"messages": prompt("x"), "response_format": response_format})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("response_format", [
    {"type": "json", "value": SCHEMA},
    {"type": "json_schema", "json_schema": {"name": "note", "schema": SCHEMA}},  # rewritten by the client
])
def test_huggingface_hub_chat_completion(server, response_format):
    client = InferenceClient(base_url=server.url, api_key="unused")
    r = client.chat_completion(messages=prompt("a note"), max_tokens=MAX_TOKENS, temperature=0,
                               response_format=response_format)
    validate(r.choices[0].message.content, SCHEMA)
