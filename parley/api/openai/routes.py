"""OpenAI-style routes: chat completions (under every prefix an SDK uses), completions, models."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from parley.api import dialects
from parley.api.lora_routes import adapter_cards
from parley.api.dialects import SILICONFLOW_CHAT_PATH, ChatBody
from parley.api.errors import ERROR_RESPONSES, fields_named, refuse_unknown_fields
from parley.api.jsonio import JSONBody
from parley.api.openai import convert, reasoning, responses
from parley.api.openai.responses import ChatShape, CompletionShape, Envelope, Shape
from parley.api.openai.schemas import CompletionRequest, SamplingFields
from parley.api.openai.tool_calls import ToolChatShape, ToolPlan
from parley.api.serving import STREAMING_RESPONSES, GenerationRoute, respond
from parley.api.state import server_of
from parley.types import GenerationRequest

# SDK-WIRE §1.2: openai/hf/mistral, azure (endpoint=URL), azure (endpoint=URL/models), friendli; and
# openai pointed at URL/siliconflow/v1 for SiliconFlow's limits and finish reasons (dialects.py)
CHAT_PATHS = ("/v1/chat/completions", "/chat/completions", "/models/chat/completions",
              "/dedicated/v1/chat/completions", SILICONFLOW_CHAT_PATH)
COMPLETION_PATHS = ("/v1/completions", "/dedicated/v1/completions")

router = APIRouter(tags=["OpenAI"], route_class=GenerationRoute, responses={**ERROR_RESPONSES, **STREAMING_RESPONSES})


async def _respond(http: Request, body: SamplingFields, requests: list[GenerationRequest], shape: Shape,
                   names: dict[str, str]) -> Response:
    """`names`: the engine's field names -> the body's, for the engine's validation errors."""
    server = server_of(http)
    env = Envelope(server.model_name, server.system_fingerprint, shape.id_prefix)
    n = requests[0].n
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    names = {"max_new_tokens": dialects.wire_name(body, "stopping.max_new_tokens") or "max_tokens",
             "seed": dialects.wire_name(body, "seeds") or "seed", **names}
    with fields_named(names):
        return await respond(
            http, requests, stream=bool(body.stream),
            to_json=lambda finals: responses.response(shape, env, finals, n),
            to_payloads=lambda batches: responses.stream_payloads(shape, env, batches, n, len(requests), include_usage),
            done_marker=True,
        )


async def chat_completions(body: ChatBody, http: Request) -> Response:
    server = server_of(http)
    engine = server.ready_engine()
    dialects.normalize(body, http, enforce_known=server.config.unknown_fields == "refuse")
    dialects.check_model(http, body.model)
    tools = ToolPlan.of(body, engine)
    request = convert.chat_request(body, engine, tools)
    phase = reasoning.split_phase(request, body, server.config.reasoning_format == "auto")
    args = (engine.tokenizer, bool(body.logprobs), phase, body.include_reasoning is not False)
    shape = dialects.response_shape(ToolChatShape(tools.format, *args) if tools else ChatShape(*args), http)
    return await _respond(http, body, [request], shape,
                          {"grammar": "tools" if tools else "response_format", "inputs": "messages",
                           "top_n_tokens": "top_logprobs"})


async def completions(body: CompletionRequest, http: Request) -> Response:
    server = server_of(http)
    refuse_unknown_fields(body, 400, server.config.unknown_fields == "refuse")
    dialects.check_model(http, body.model)
    requests = convert.completion_requests(body, server.ready_engine(), server.config.max_client_batch_size)
    shape = dialects.response_shape(CompletionShape(body.logprobs is not None), http)
    return await _respond(http, body, requests, shape,
                          {"grammar": "response_format", "inputs": "prompt", "top_n_tokens": "logprobs"})


for path in CHAT_PATHS:
    router.add_api_route(path, chat_completions, methods=["POST"], summary="Chat completion (OpenAI)",
                         include_in_schema=path == CHAT_PATHS[0])
for path in COMPLETION_PATHS:
    router.add_api_route(path, completions, methods=["POST"], summary="Completion (OpenAI legacy)",
                         include_in_schema=path == COMPLETION_PATHS[0])

models_router = APIRouter(tags=["OpenAI"])


@models_router.get("/v1/models", summary="The served model (each of its names) and its LoRA adapters")
async def list_models(http: Request) -> Response:
    server = server_of(http)
    max_context_length = server.ready_engine().config.max_total_tokens
    base = {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "parley",
            **dialects.mistral_model_card(max_context_length)}
    aliases = [{**base, "id": name} for name in server.model_names[1:]]
    return JSONBody({"object": "list", "data": [base, *aliases, *adapter_cards(server.ready_engine(), base)]})
