"""OpenAI chat/completions requests -> GenerationRequest. Fields some vendor spells or shapes its
own way (seeds, output budget, top_k...) map through the one table, `dialects.FIELDS`."""

from __future__ import annotations

from parley.api import dialects
from parley.api.lora_routes import adapter_for_model
from parley.api.budget import room_for_output
from parley.api.errors import require, validation_error
from parley.api.openai import reasoning
from parley.api.openai.schemas import ChatMessage, ChatRequest, CompletionRequest, SamplingFields
from parley.api.openai.response_format import body_grammar
from parley.api.openai.tool_calls import ToolPlan, template_inputs
from parley.tokenization.reasoning import ANSWER, MAYBE, prompt_phase
from parley.types import Engine, GenerationRequest, SamplingParams, StoppingCriteria


COMPLETION_MAX_TOKENS = 32  # TGI's spec: /v1/completions' max_tokens defaults to 32


async def generation_request(body: SamplingFields, prompt: str | list[int], engine: Engine, *,
                             add_special_tokens: bool, top_n_tokens: int,
                             default_max_tokens: int | None = None) -> GenerationRequest:
    """The request with `prompt` tokenized (once: the engine takes the ids), or its ids as given (the
    engine checks they are the model's). `default_max_tokens`:
    the output budget when the body names none (at most what the context leaves); None: what the
    context leaves."""
    require(body.stream or not body.stream_options,
            "Input validation error: `stream_options` is only allowed when `stream` is true", "stream_options")
    temperature = 1.0 if body.temperature is None else body.temperature
    request = GenerationRequest(
        prompt=prompt,
        add_special_tokens=add_special_tokens,
        sampling=SamplingParams(
            do_sample=temperature > 0,
            temperature=temperature or 1.0,  # 0 means greedy, not a division by zero
            top_p=body.top_p or 1.0,
            min_p=body.min_p or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            presence_penalty=body.presence_penalty or 0.0,
            logit_bias=_logit_bias(body.logit_bias),
            top_n_tokens=top_n_tokens,
        ),
        stopping=StoppingCriteria(
            stop_sequences=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        ),
        n=body.n or 1,
        grammar=body_grammar(body),
        adapter_id=adapter_for_model(engine, body.model),  # a body's own adapter_id (dialects) wins
    )
    # seeds, output budget, top_k... : every vendor's spelling, through the one table
    given = dialects.apply(body, request)
    request.prompt = await engine.tokenize(prompt, add_special_tokens) if isinstance(prompt, str) else prompt
    if "stopping.max_new_tokens" not in given:
        room = room_for_output(engine.info, len(request.prompt), request.truncate)
        request.stopping.max_new_tokens = min(room, default_max_tokens or room)
    return request


async def chat_request(body: ChatRequest, engine: Engine, tools: ToolPlan | None = None) -> GenerationRequest:
    """Messages go through the model's chat template; the rendered text already holds any BOS."""
    _check_tool_results(body.messages)
    continues = _continues_last_message(body.messages, tools)
    messages = [_template_message(m.model_dump(exclude_none=True)) for m in body.messages]
    variables, thinking_off = reasoning.template_variables(body, engine.info)
    messages, template_kwargs = template_inputs(messages, tools, engine.info.chat_template)
    try:
        prompt = engine.render(messages, continue_final_message=continues, **variables, **template_kwargs)
    except ValueError as exc:  # the template refused the messages (e.g. an image for a text model)
        raise validation_error(f"Input validation error: `messages`: {exc}", "messages") from exc
    require(body.logprobs or not body.top_logprobs,
            "Input validation error: `top_logprobs` needs `logprobs` to be true", "top_logprobs")
    top_n = (body.top_logprobs or 0) if body.logprobs else 0
    request = await generation_request(body, prompt, engine, add_special_tokens=False, top_n_tokens=top_n)
    if tools:
        request.grammar = tools.grammar()
    phase = prompt_phase(prompt)
    if continues and phase == MAYBE:  # it goes on with an answer: a thinking cannot open in its middle
        phase = ANSWER
    reasoning.apply_rules(request, body, engine.info, thinking_off, phase)
    return request


async def completion_requests(body: CompletionRequest, engine: Engine,
                              max_client_batch_size: int) -> list[GenerationRequest]:
    prompts = _prompts(body)
    require(len(prompts) > 0, "Input validation error: `prompt` cannot be an empty list", "prompt")
    require(len(prompts) <= max_client_batch_size,
            f"Input validation error: `prompt` holds {len(prompts)} prompts; at most {max_client_batch_size} "
            "are allowed (max_client_batch_size)", "prompt")
    require(not (body.echo and body.stream), "Input validation error: `echo` is not supported with `stream`", "echo")
    require(not (body.echo and (body.n or 1) > 1), "Input validation error: `echo` takes one choice a prompt (`n`: 1)",
            "echo")
    require(not (body.echo and body.suffix is not None), "Input validation error: `echo` is not supported with "
            "`suffix`", "echo")
    requests = [await completion_request(body, p, engine, body.suffix, top_n_tokens=body.logprobs or 0) for p in prompts]
    for request in requests:  # the prompt's tokens come back with the answer: their logprobs computed
        request.decoder_input_details = request.prompt_top_tokens = bool(body.echo)
    return requests


async def completion_request(body: SamplingFields, prompt: str | list[int], engine: Engine, suffix: str | None, *,
                             top_n_tokens: int = 0,
                             default_max_tokens: int | None = COMPLETION_MAX_TOKENS) -> GenerationRequest:
    """A completion of `prompt`, or with a `suffix` what goes between the two, for a model that fills
    in the middle (tokenization/infill.py): the prompt arranged around the gap with its markers, and
    the middle ended by the tokens that end it. `default_max_tokens` as generation_request's."""
    infill = engine.info.infill
    if suffix is not None:
        require(infill is not None, "Input validation error: `suffix` needs a model that fills in the middle; this "
                "one's vocabulary has no fill-in-the-middle markers (such as <|fim_prefix|> or <fim_prefix>)",
                "suffix")
        prompt = infill.text(prompt, suffix) if isinstance(prompt, str) else infill.ids(
            prompt, await engine.tokenize(suffix, add_special_tokens=False))
    request = await generation_request(body, prompt, engine, add_special_tokens=True, top_n_tokens=top_n_tokens,
                                       default_max_tokens=default_max_tokens)
    if suffix is not None:
        request.stopping.extra_eos_token_ids += infill.end_ids
    return request


def echo_texts(body: CompletionRequest) -> list[str | None] | None:
    """With `echo`, each prompt's text as the client sent it (None for token ids: the text of its
    tokens); None without."""
    return [p if isinstance(p, str) else None for p in _prompts(body)] if body.echo else None


def _prompts(body: CompletionRequest) -> list[str | list[int]]:
    """The body's prompts: a text, or one prompt's token ids, is one."""
    one = isinstance(body.prompt, str) or bool(body.prompt) and isinstance(body.prompt[0], int)
    return [body.prompt] if one else body.prompt


def _check_tool_results(messages: list[ChatMessage]) -> None:
    """As OpenAI: a message with role 'tool' answers a tool call of the assistant message before it
    (other results may stand between them), the one its tool_call_id names when both carry ids."""
    calls: set[str] | None = None  # the open assistant turn's call ids; None: no turn with calls
    for i, message in enumerate(messages):
        if message.role != "tool":
            calls = None
            if message.role == "assistant" and message.tool_calls:
                calls = {call["id"] for call in message.tool_calls if isinstance(call.get("id"), str)}
            continue
        require(calls is not None, f"Input validation error: `messages.{i}`: a message with role 'tool' must "
                "answer the `tool_calls` of an assistant message before it", f"messages.{i}")
        require(not (calls and message.tool_call_id) or message.tool_call_id in calls,
                f"Input validation error: `messages.{i}.tool_call_id`: {message.tool_call_id!r} answers none of "
                f"the assistant's tool calls ({', '.join(sorted(calls))})", f"messages.{i}.tool_call_id")


def answer_prefix(messages: list[ChatMessage]) -> str:
    """The text of the assistant message the answer continues (`prefix`, checked by chat_request), which
    Mistral's answer starts with: its guide's example sends "Oh!" and gets "Oh! Hello there! ..."
    (docs.mistral.ai/guides/prefix). "" without one."""
    last = messages[-1] if messages else None
    if last is None or not last.prefix:
        return ""
    return last.content if isinstance(last.content, str) else "".join(p.text or "" for p in last.content or [])


def _continues_last_message(messages: list[ChatMessage], tools: ToolPlan | None) -> bool:
    """Mistral's `prefix`: true on the last message, an assistant's with text, makes the prompt end
    inside that turn, so the model continues it (its answer repeats the prefix: answer_prefix)."""
    for i, message in enumerate(messages):
        if not message.prefix:
            continue
        where = f"messages.{i}.prefix"
        require(i == len(messages) - 1 and message.role == "assistant", f"Input validation error: `{where}`: only "
                "the last message, an assistant's, can be a prefix for the answer to continue", where)
        require(not message.tool_calls, f"Input validation error: `{where}`: an assistant message with "
                "`tool_calls` cannot be continued", where)
        require(answer_prefix(messages).strip(), f"Input validation error: `messages.{i}.content`: a prefix needs "
                "text to continue", f"messages.{i}.content")
        require(tools is None, f"Input validation error: `{where}` cannot be combined with `tools` (a tool call "
                'cannot continue a text answer): drop one, or set `tool_choice` to "none"', where)
        return True
    return False


def _template_message(message: dict) -> dict:
    if message["role"] == "developer":  # OpenAI's newer name for the system role; templates know "system"
        message["role"] = "system"
    if "reasoning" in message:  # templates read reasoning_content
        message.setdefault("reasoning_content", message.pop("reasoning"))
    refusal = message.pop("refusal", None)
    if refusal and not message.get("content"):  # what that answer said
        message["content"] = refusal
    message.pop("annotations", None)  # empty (the schema allows no other)
    message.pop("prefix", None)  # chat_request's continue_final_message
    return message


def _logit_bias(bias: dict[str, float] | list[float] | None) -> dict[int, float]:
    if not bias:
        return {}
    if isinstance(bias, list):  # TGI's spec: element i is token i's bias (the engine checks i < vocab)
        return {i: v for i, v in enumerate(bias) if v}
    require(all(k.strip().isdigit() for k in bias),
            "Input validation error: `logit_bias` keys must be token ids (integers as strings)", "logit_bias")
    return {int(k): v for k, v in bias.items()}
