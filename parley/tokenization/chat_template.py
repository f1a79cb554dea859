"""A model's Jinja chat template, rendered with Hugging Face transformers' semantics."""

from __future__ import annotations

import functools
import json
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Used when the model ships no template.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# What `render` itself passes to the template (with the special tokens' text), and its own flag.
RENDER_VARIABLES = ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "continue_final_message")


class ChatTemplateError(ValueError):
    """The messages cannot be rendered: the template refused them or failed on them."""


def _raise_exception(message: str):
    raise ChatTemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@functools.lru_cache(maxsize=8)
def reads_tools(source: str | None) -> bool:
    """Whether a template reads the `tools` variable that `render` passes. Not whether it mentions
    tools: Phi-4-mini's reads a system message's own `tools` key and would drop ours unseen."""
    if not source:
        return False
    env = ImmutableSandboxedEnvironment(extensions=[jinja2.ext.loopcontrols])
    return "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))


class ChatTemplate:
    """Compiled once per model; `render` turns OpenAI-style messages into the prompt text."""

    def __init__(self, template: str | None, bos_token: str | None, eos_token: str | None):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        source = template or DEFAULT_CHAT_TEMPLATE
        self._template = env.from_string(source)
        self._special_tokens = {"bos_token": bos_token, "eos_token": eos_token}
        # the variables a request may set (chat_template_kwargs): those the template reads, but ours
        self.variables = frozenset(jinja2.meta.find_undeclared_variables(env.parse(source))) - set(RENDER_VARIABLES) \
            - set(env.globals)

    def render(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **extra,
    ) -> str:
        """`continue_final_message`: the prompt ends inside the last message, right after its content
        (no end-of-turn, no generation prompt), so the model goes on writing it (transformers' flag)."""
        messages = [_prepare(m) for m in messages]
        try:
            text = self._template.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                **{**self._special_tokens, **extra},
            )
        except (jinja2.TemplateError, TypeError) as e:  # e.g. sandbox violations, None + str
            raise ChatTemplateError(f"chat template failed: {e}") from e
        return _cut_after(text, messages[-1].get("content") or "") if continue_final_message else text


def _cut_after(text: str, content: str) -> str:
    """`text` up to the end of its last copy of `content`, as transformers cuts for
    continue_final_message: a template that strips the content's spaces keeps it without them."""
    if not content.strip() or content.strip() not in text:
        raise ChatTemplateError("the final message's content is empty or the chat template does not show it as "
                                "sent, so the answer cannot continue it")
    start = text.rindex(content.strip())
    kept = content.lstrip() if text[start:start + len(content.lstrip())] == content.lstrip() else content.strip()
    return text[:start + len(kept)]


def _prepare(message: dict) -> dict:
    """A copy of the message in the shape templates expect: content as one string (the model is
    text-only, so a chunk list is only text; an assistant turn that only calls tools has "", as
    templates that split or concatenate it, like Qwen3's, need) and tool call arguments as
    objects, not JSON text (templates `tojson` them)."""
    message = dict(message)
    content = message.get("content")
    if isinstance(content, list):
        message["content"] = "".join(_chunk_text(chunk) for chunk in content)
    if content is None and message.get("tool_calls"):
        message["content"] = ""
    if message.get("tool_calls"):
        message["tool_calls"] = [_parse_arguments(call) for call in message["tool_calls"]]
    return message


def _chunk_text(chunk: dict) -> str:
    kind = chunk.get("type")
    if kind == "text":
        return chunk["text"]
    if kind in ("image_url", "image"):
        raise ChatTemplateError("image content is not supported: this model is text-only")
    raise ChatTemplateError(f"unsupported content chunk type {kind!r}")


def _parse_arguments(call: dict) -> dict:
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError:
        return call  # left as text: the template shows what the client sent
    return {**call, "function": {**function, "arguments": arguments}}
