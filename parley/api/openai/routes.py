"""OpenAI-style routes: chat completions (under every prefix an SDK uses), completions, Mistral's
fill-in-the-middle, models."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute

from parley.api import dialects
from parley.api.dialects import FRIENDLI, OPENAI, SILICONFLOW, ChatBody, speaking
from parley.api.errors import ERROR_RESPONSES, fields_named, refuse_unknown_fields, require
from parley.api.jsonio import JSONBody
from parley.api.lora_routes import adapter_cards
from parley.api.openai import convert, reasoning, responses
from parley.api.openai.responses import ChatShape, CompletionShape, Envelope, Shape
from parley.api.openai.schemas import CompletionRequest, InfillRequest, SamplingFields
from parley.api.openai.tool_calls import ToolChatShape, ToolPlan
from parley.api.serving import STREAMING_RESPONSES, GenerationRoute, respond
from parley.api.state import server_of
from parley.tokenization.reasoning import THINKING
from parley.types import GenerationRequest

# SDK-WIRE §1.2: openai/hf/mistral, azure (endpoint=URL), azure (endpoint=URL/models), friendli; and
# openai pointed at URL/siliconflow/v1 for SiliconFlow's limits and finish reasons (dialects.py)
CHAT_PATHS = {"/v1/chat/completions": OPENAI, "/chat/completions": OPENAI, "/models/chat/completions": OPENAI,
              "/dedicated/v1/chat/completions": FRIENDLI, "/siliconflow/v1/chat/completions": SILICONFLOW}
COMPLETION_PATHS = {"/v1/completions": OPENAI, "/dedicated/v1/completions": FRIENDLI}

router = APIRouter(tags=["OpenAI"], route_class=speaking(GenerationRoute, OPENAI),
                   responses={**ERROR_RESPONSES, **STREAMING_RESPONSES})


async def _respond(http: Request, body: SamplingFields, requests: list[GenerationRequest], shape: Shape) -> Response:
    server = server_of(http)
    env = Envelope(server.model_name, server.system_fingerprint, shape.id_prefix)
    n = requests[0].n
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
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
    with fields_named(dialects.engine_names(body, tools=tools is not None)):
        request = await convert.chat_request(body, engine, tools)
        phase = reasoning.split_phase(request, body, server.config.reasoning_format == "auto")
        args = (engine.token_bytes, bool(body.logprobs), phase, body.include_reasoning is not False)
        # a prefix that opened a thinking goes on as reasoning: the content does not start with it
        prefix = convert.answer_prefix(body.messages) if phase != THINKING else ""
        shape = ToolChatShape(tools.format, *args) if tools else ChatShape(*args, prefix)
        shape = dialects.response_shape(shape, http)
        return await _respond(http, body, [request], shape)


async def completions(body: CompletionRequest, http: Request) -> Response:
    server = server_of(http)
    refuse_unknown_fields(body, 400, server.config.unknown_fields == "refuse")
    dialects.check_model(http, body.model)
    require(not body.echo or dialects.dialect_of(http) is OPENAI,
            "Input validation error: `echo` is OpenAI's, not on this route", "echo")
    with fields_named(dialects.engine_names(body, prompt="prompt", top_n_tokens="logprobs")):
        requests = await convert.completion_requests(body, server.ready_engine(), server.config.max_client_batch_size)
        shape = dialects.response_shape(CompletionShape(body.logprobs is not None, convert.echo_texts(body)), http)
        return await _respond(http, body, requests, shape)


async def fill_in_middle(body: InfillRequest, http: Request) -> Response:
    """Mistral's `client.fim.complete` and `.stream`: a completion (of the gap, with a suffix),
    answered as chat answers."""
    server = server_of(http)
    refuse_unknown_fields(body, 400, server.config.unknown_fields == "refuse")
    dialects.check_model(http, body.model)
    engine = server.ready_engine()
    with fields_named(dialects.engine_names(body, prompt="prompt")):
        request = await convert.completion_request(body, body.prompt, engine, body.suffix, default_max_tokens=None)
        return await _respond(http, body, [request], ChatShape(engine.token_bytes, logprobs=False))


router.add_api_route("/v1/fim/completions", fill_in_middle, methods=["POST"], summary="Fill in the middle (Mistral)")
for path, dialect in CHAT_PATHS.items():
    router.add_api_route(path, chat_completions, methods=["POST"], summary="Chat completion (OpenAI)",
                         include_in_schema=path == "/v1/chat/completions",
                         route_class_override=speaking(GenerationRoute, dialect))
for path, dialect in COMPLETION_PATHS.items():
    router.add_api_route(path, completions, methods=["POST"], summary="Completion (OpenAI legacy)",
                         include_in_schema=path == "/v1/completions", route_class_override=speaking(GenerationRoute, dialect))

models_router = APIRouter(tags=["OpenAI"], route_class=speaking(APIRoute, OPENAI))


@models_router.get("/v1/models", summary="The served model (each of its names) and its LoRA adapters")
async def list_models(http: Request) -> Response:
    server = server_of(http)
    info = server.ready_engine().info
    base = {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "parley",
            **dialects.mistral_model_card(info.max_total_tokens, info.infill is not None)}
    aliases = [{**base, "id": name} for name in server.model_names[1:]]
    return JSONBody({"object": "list", "data": [base, *aliases, *adapter_cards(server.ready_engine(), base)]})
