"""Thinking models on the chat routes: what reaches the chat template, the rules the engine follows
(types.Reasoning), and whether the answer's reasoning is split off (docs/API.md, "Reasoning").

- `chat_template_kwargs` (vLLM's and Friendli's name) are variables for the template. Each must be
  one the template reads, and none may be one the server sets itself: anything else is refused by
  name rather than silently unused.
- `enable_thinking` (SiliconFlow's field, or a template variable) goes to a template that has the
  switch (Qwen3's closes an empty thinking). A thinking model whose template has none (DeepSeek-R1
  thinks always) is made to close its thinking at once by the engine; a model that does not think
  refuses `enable_thinking: true` and `thinking_budget`.
- `thinking_budget` (SiliconFlow; Friendli's `reasoning_budget`, which it overrides) bounds the
  thinking: the engine forces "</think>" when it is spent.
"""

from __future__ import annotations

import dataclasses

from parley.api.budget import room_for_output
from parley.api.errors import require
from parley.tokenization.chat_template import RENDER_VARIABLES
from parley.tokenization.reasoning import ANSWER
from parley.types import EngineInfo, GenerationRequest

SILICONFLOW_DEFAULT_BUDGET = 4096  # SiliconFlow's documented default thinking_budget


def template_variables(body, info: EngineInfo) -> tuple[dict, bool]:
    """The request's chat template variables, and whether the engine must keep the model from
    thinking (enable_thinking false, with a template that has no such switch)."""
    variables = dict(body.chat_template_kwargs or {})
    if body.enable_thinking is not None:
        require(variables.get("enable_thinking", body.enable_thinking) == body.enable_thinking,
                "Input validation error: `enable_thinking` and `chat_template_kwargs.enable_thinking` disagree",
                "enable_thinking")
        variables["enable_thinking"] = body.enable_thinking
    field = "enable_thinking" if body.enable_thinking is not None else "chat_template_kwargs.enable_thinking"
    for name in variables:
        require(name not in RENDER_VARIABLES, f"Input validation error: `chat_template_kwargs.{name}` is set by the "
                "server from the request itself", f"chat_template_kwargs.{name}")
        require(name in info.template_variables or name == "enable_thinking",
                f"Input validation error: `chat_template_kwargs.{name}`: the model's chat template does not read "
                f"`{name}` (it reads: {', '.join(sorted(info.template_variables)) or 'none'})",
                f"chat_template_kwargs.{name}")
    engine_off = False
    if "enable_thinking" in variables and "enable_thinking" not in info.template_variables:
        thinking = variables.pop("enable_thinking")
        require(info.reasoning is not None or not thinking,
                f"Input validation error: `{field}`: this model does not think", field)
        engine_off = thinking is False
    return variables, engine_off


def apply_rules(request: GenerationRequest, body, info: EngineInfo, engine_off: bool, phase: str) -> None:
    """Sets `request.reasoning` for a thinking model, from where its rendered prompt leaves it
    (`phase`, tokenization.reasoning.prompt_phase); `request.prompt` holds its token ids."""
    field = "thinking_budget" if body.thinking_budget is not None else "reasoning_budget"
    given = body.thinking_budget if body.thinking_budget is not None else body.reasoning_budget
    if info.reasoning is None:
        require(given is None, f"Input validation error: `{field}`: this model does not think", field)
        return
    budget = 0 if engine_off else given
    rules = dataclasses.replace(info.reasoning, phase=phase, budget=budget)
    if not body._max_tokens_counts_thinking and phase != ANSWER and budget != 0:
        # SiliconFlow: max_tokens bounds the answer; the thinking has its own budget on top
        rules.budget = SILICONFLOW_DEFAULT_BUDGET if budget is None else budget
        if body.max_tokens is not None:
            rules.max_answer_tokens = body.max_tokens
            room = room_for_output(info, len(request.prompt))
            request.stopping.max_new_tokens = min(body.max_tokens + rules.budget, max(room, body.max_tokens))
    request.reasoning = rules


def split_phase(request: GenerationRequest, body, default_parse: bool) -> str | None:
    """Where the answer's text starts for the reasoning split (tokenization/reasoning.py), or None
    when the reasoning stays in the content (`parse_reasoning` false, or a model that does not think)."""
    parse = default_parse if body.parse_reasoning is None else body.parse_reasoning
    return request.reasoning.phase if parse and request.reasoning is not None else None
