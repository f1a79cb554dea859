"""TGI's native routes: POST / (compat), /generate, /generate_stream, /tokenize."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from parley.api.dialects import TGI, engine_names, speaking
from parley.api.errors import ERROR_RESPONSES, fields_named, refuse_unknown_fields
from parley.api.jsonio import JSONBody
from parley.api.serving import STREAMING_RESPONSES, GenerationRoute, StrictJSONRoute, respond
from parley.api.state import server_of
from parley.api.tgi import convert, responses
from parley.api.tgi.schemas import CompatGenerateRequest, GenerateRequest

router = APIRouter(tags=["Text Generation Inference"], route_class=speaking(GenerationRoute, TGI),
                   responses=ERROR_RESPONSES)


async def _generate(http: Request, body: GenerateRequest, *, stream: bool, as_list: bool) -> Response:
    server = server_of(http)
    refuse_unknown_fields(body, 422, server.config.unknown_fields == "refuse")
    engine = server.ready_engine()
    params = body.params

    def to_json(finals):
        answer = responses.generate_response(finals[0], body.inputs, params)
        return [answer] if as_list else answer

    with fields_named(engine_names(params, prompt="inputs", max_new_tokens="max_new_tokens", top_n_tokens="top_n_tokens",
                                   n="best_of", grammar="grammar")):
        request = await convert.generation_request(body, engine, stream=stream)
        return await respond(http, [request], stream=stream, to_json=to_json,
                             to_payloads=lambda batches: responses.stream_payloads(batches, body.inputs, params),
                             done_marker=False)


@router.post("/", summary="Generate tokens; streams (SSE) when `stream` is true, else answers a JSON list",
             responses=STREAMING_RESPONSES)
async def compat_generate(body: CompatGenerateRequest, http: Request) -> Response:
    return await _generate(http, body, stream=bool(body.stream), as_list=True)


@router.post("/generate", summary="Generate tokens")
async def generate(body: GenerateRequest, http: Request) -> Response:
    return await _generate(http, body, stream=False, as_list=False)


@router.post("/generate_stream", summary="Generate a stream of tokens (SSE)", responses=STREAMING_RESPONSES)
async def generate_stream(body: GenerateRequest, http: Request) -> Response:
    return await _generate(http, body, stream=True, as_list=False)


tokenize_router = APIRouter(tags=["Text Generation Inference"], route_class=speaking(StrictJSONRoute, TGI))


@tokenize_router.post("/tokenize", summary="Tokenize inputs (with special tokens, like generation)")
async def tokenize(body: GenerateRequest, http: Request) -> Response:
    tokens = server_of(http).ready_engine().tokenize_with_offsets(body.inputs, add_special_tokens=True)
    truncate = body.params.truncate
    if truncate:
        tokens = tokens[-truncate:]
    return JSONBody([{"id": i, "text": body.inputs[start:stop], "start": start, "stop": stop}
                     for i, start, stop in tokens])
