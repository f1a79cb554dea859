import pytest

from parley.tools import MAX_TOOLS, ToolSpecError, validate_tools


def tool(name="get_weather", **function):
    return {"type": "function", "function": {"name": name, **function}}


@pytest.mark.parametrize(
    "tools, tool_choice, field",
    [
        ("not a list", "auto", "tools"),
        ([tool(f"f{i}") for i in range(MAX_TOOLS + 1)], "auto", "tools"),
        (["get_weather"], "auto", "tools[0]"),
        ([{"type": "retrieval", "function": {"name": "f"}}], "auto", "tools[0].type"),
        ([{"type": "function"}], "auto", "tools[0].function"),
        ([tool("has space")], "auto", "tools[0].function.name"),
        ([tool("x" * 65)], "auto", "tools[0].function.name"),
        ([tool(""), tool()], "auto", "tools[0].function.name"),
        ([tool(), tool("café")], "auto", "tools[1].function.name"),
        ([tool(), tool()], "auto", "tools[1].function.name"),
        ([tool(description=3)], "auto", "tools[0].function.description"),
        ([tool(parameters="{}")], "auto", "tools[0].function.parameters"),
        ([tool(parameters={"type": "array"})], "auto", "tools[0].function.parameters.type"),
        ([tool()], "sometimes", "tool_choice"),
        ([], "required", "tool_choice"),
        ([tool()], {"type": "function", "function": {"name": "get_time"}}, "tool_choice.function.name"),
        ([tool()], {"type": "function"}, "tool_choice.function.name"),
        ([tool()], {"type": "code_interpreter"}, "tool_choice"),
    ],
)
def test_bad_tools_name_the_field(tools, tool_choice, field):
    with pytest.raises(ToolSpecError) as raised:
        validate_tools(tools, tool_choice)
    assert raised.value.field == field
    assert str(raised.value).startswith(f"{field}: ")
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize(
    "tool_choice", ["none", "auto", "required", {"type": "function", "function": {"name": "a-b_9"}}]
)
def test_good_tools_pass(tool_choice):
    validate_tools(
        [tool("a-b_9", parameters={"type": "object", "properties": {}}), tool("x" * 64)], tool_choice
    )


def test_no_tools_with_auto_or_none_is_fine():
    validate_tools([], "auto")
    validate_tools([], "none")


def test_strict_schemas_close_every_object_and_refuse_open_ones():
    from parley.tools.validation import strict_schema

    schema = {"type": "object", "properties": {
        "city": {"type": "string"},
        "stops": {"type": "array", "items": {"type": "object", "properties": {"at": {"type": "string"}}}},
        "where": {"anyOf": [{"type": "object", "properties": {"lat": {"type": "number"}}}, {"type": "null"}]},
    }, "$defs": {"p": {"type": "object"}}}
    closed = strict_schema(schema, "s")
    assert closed["additionalProperties"] is False and "additionalProperties" not in schema  # a copy
    assert closed["properties"]["stops"]["items"]["additionalProperties"] is False
    assert closed["properties"]["where"]["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["where"]["anyOf"][1]
    assert closed["$defs"]["p"]["additionalProperties"] is False
    opened = {"type": "object", "properties": {"a": {"type": "object", "additionalProperties": True}}}
    with pytest.raises(ToolSpecError) as refused:
        strict_schema(opened, "tools[0].function.parameters")
    assert refused.value.field == "tools[0].function.parameters.properties.a.additionalProperties"
    with pytest.raises(ToolSpecError, match=r"tools\[0\]\.function\.parameters\.properties\.a"):
        validate_tools([{"type": "function", "function": {"name": "f", "strict": True, "parameters": opened}}])
    validate_tools([{"type": "function", "function": {"name": "f", "parameters": opened}}])  # not strict: fine
