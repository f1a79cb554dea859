"""OpenAI-style routes: chat completions (under every prefix an SDK uses), completions, models."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from parley.api.errors import ERROR_RESPONSES
from parley.api.jsonio import JSONBody
from parley.api.openai import convert, responses
from parley.api.openai.responses import ChatShape, CompletionShape, Envelope, Shape
from parley.api.openai.schemas import ChatRequest, CompletionRequest, SamplingFields
from parley.api.serving import GenerationRoute, respond
from parley.api.state import server_of
from parley.types import GenerationRequest

# SDK-WIRE §1.2: openai/hf/mistral, azure (endpoint=URL), azure (endpoint=URL/models), friendli
CHAT_PATHS = ("/v1/chat/completions", "/chat/completions", "/models/chat/completions",
              "/dedicated/v1/chat/completions")
COMPLETION_PATHS = ("/v1/completions", "/dedicated/v1/completions")

router = APIRouter(tags=["OpenAI"], route_class=GenerationRoute, responses=ERROR_RESPONSES)


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


async def chat_completions(body: ChatRequest, http: Request) -> Response:
    engine = server_of(http).ready_engine()
    return await _respond(http, body, [convert.chat_request(body, engine)],
                          ChatShape(engine.tokenizer, bool(body.logprobs)))


async def completions(body: CompletionRequest, http: Request) -> Response:
    server = server_of(http)
    requests = convert.completion_requests(body, server.ready_engine(), server.config.max_client_batch_size)
    return await _respond(http, body, requests, CompletionShape(body.logprobs is not None))


for path in CHAT_PATHS:
    router.add_api_route(path, chat_completions, methods=["POST"], summary="Chat completion (OpenAI)",
                         include_in_schema=path == CHAT_PATHS[0])
for path in COMPLETION_PATHS:
    router.add_api_route(path, completions, methods=["POST"], summary="Completion (OpenAI legacy)",
                         include_in_schema=path == COMPLETION_PATHS[0])

models_router = APIRouter(tags=["OpenAI"])


@models_router.get("/v1/models", summary="The served model")
async def list_models(http: Request) -> Response:
    server = server_of(http)
    return JSONBody({"object": "list", "data": [
        {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "parley"}]})
