"""The server's status routes: /health, /info (TGI Info + Azure ModelInfo, SDK-WIRE §1.6), /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from fastapi.routing import APIRoute

from parley.api.dialects import TGI, speaking
from parley.api.errors import ApiError, ErrorResponse
from parley.api.jsonio import JSONBody
from parley.api.state import VERSION, server_of

router = APIRouter(tags=["Text Generation Inference"], route_class=speaking(APIRoute, TGI))


@router.get("/health", summary="200 once the model is loaded and the engine runs, 503 before",
            response_class=Response, responses={200: {"description": "Ready (an empty body)", "content": {}},
                                                503: {"model": ErrorResponse, "description": "Not ready yet"}})
async def health(http: Request) -> Response:
    try:
        server_of(http).ready_engine()
    except ApiError as err:
        return JSONBody({"error": err.message, "error_type": "healthcheck"}, status_code=503)
    return Response(status_code=200)


@router.get("/info", summary="Served model info (TGI Info and Azure ModelInfo fields)")
@router.get("/models/info", include_in_schema=False)
async def info(http: Request) -> Response:
    server = server_of(http)
    engine = server.ready_engine()
    cfg = engine.info
    return JSONBody({
        "model_id": cfg.model_id,
        "model_sha": None,
        "model_dtype": cfg.dtype,
        "model_device_type": cfg.device,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": cfg.max_concurrent_requests,
        "max_best_of": cfg.max_best_of,
        "max_stop_sequences": cfg.max_stop_sequences,
        "max_top_n_tokens": cfg.max_top_n_tokens,  # not TGI's: the largest top_n_tokens / top_logprobs
        "max_input_tokens": cfg.max_input_tokens,
        "max_total_tokens": cfg.max_total_tokens,
        "waiting_served_ratio": cfg.waiting_served_ratio,
        "max_batch_total_tokens": cfg.max_batch_total_tokens,
        "max_waiting_tokens": cfg.max_waiting_tokens,
        "max_batch_size": cfg.max_batch_size,
        "validation_workers": 1,
        "max_client_batch_size": server.config.max_client_batch_size,
        "lora_adapters": [{"name": a.name, "path": a.path, "rank": a.rank} for a in engine.list_adapters()],
        "router": "parley",
        "version": VERSION,
        "sha": None,
        "docker_label": None,
        # Azure AI Inference's get_model_info()
        "model_name": server.model_name,
        "model_type": "chat_completion",
        "model_provider_name": "Parley",
        # every name `model` may give (--served-model-name)
        "served_model_names": list(server.model_names),
    })


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(http: Request) -> Response:
    body, content_type = server_of(http).metrics.render()
    return Response(body, media_type=content_type)
