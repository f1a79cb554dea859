"""What the SDK tests share: the key, the prompts, and checks of structured answers."""

from __future__ import annotations

import json

KEY = "sdk-key"  # the server's --api-key: every SDK must send it its own way
# Greedy answers are compared token for token: this prompt keeps a margin of >= 0.125 nats between its
# top two tokens over its whole answer, so no near-tie makes a test depend on the last bit of rounding.
MESSAGES = [{"role": "user", "content": "Describe the sun in one sentence."}]
HI = [{"role": "user", "content": "Hi"}]  # greedy: the model ends its answer itself, in about 10 tokens
JSON_MESSAGES = [{"role": "user", "content": "Give the capital of France as JSON."}]
CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
               "additionalProperties": False}
WEATHER_MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_FUNCTION = {"name": "get_weather", "description": "The current weather in a city",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                   "required": ["city"]}}
WEATHER_TOOL = {"type": "function", "function": WEATHER_FUNCTION}
SAMPLED = {"temperature": 1.0, "max_tokens": 6}  # sampling, so that seeds matter


def assert_city_json(text: str) -> None:
    """`text` is what CITY_SCHEMA asks for."""
    value = json.loads(text)
    assert set(value) == {"city"} and isinstance(value["city"], str), text


def assert_weather_call(name: str, arguments: str | dict) -> None:
    """A well-formed call of WEATHER_TOOL; `arguments` as JSON text (or already parsed, Mistral)."""
    assert name == "get_weather"
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    assert isinstance(args.get("city"), str), arguments
