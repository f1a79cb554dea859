"""LoRA adapters over HTTP: vLLM's routes to load and unload them while serving, and which adapter
an OpenAI-style `model` names.

The routes read local folders, so they exist only behind --api-key (vLLM likewise needs an opt-in),
and loading reads only folders under --lora-root: without either, or for a path that resolves
outside the root (`..`, symlinks), they answer 403 saying so. Errors: 422 for an adapter that cannot be loaded or named
so (the message says why), 404 for unloading an adapter that is not loaded.
Unloading never loses a request: new requests for the adapter get 404 at once, the ones already
running finish with it.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

from parley.api.dialects import OPENAI, speaking
from parley.api.errors import ERROR_RESPONSES, ApiError, ErrorResponse
from parley.api.serving import StrictJSONRoute
from parley.api.state import ServerState, server_of
from parley.types import Engine

# Answers are plain text (vLLM's), errors JSON: with a media-type-less default class FastAPI documents
# the error models as application/json, and the 200 says text/plain itself.
router = APIRouter(tags=["LoRA adapters"], route_class=speaking(StrictJSONRoute, OPENAI), default_response_class=Response,
                   responses={
    **ERROR_RESPONSES,
    403: {"model": ErrorResponse, "description": "Without --api-key or --lora-root, or a path outside the root"},
    200: {"description": "Success (plain text)", "content": {"text/plain": {"schema": {"type": "string"}}}}})


class LoadLoRAAdapter(BaseModel):
    lora_name: str = Field(description="the name requests select it by (`model`, `adapter_id`)")
    lora_path: str = Field(description="a PEFT folder (adapter_config.json + adapter_model.safetensors) under "
                                       "--lora-root, absolute or relative to it")


class UnloadLoRAAdapter(BaseModel):
    lora_name: str


def _admin(http: Request) -> ServerState:
    server = server_of(http)
    if not server.config.api_key:
        raise ApiError(403, "loading and unloading LoRA adapters over HTTP needs the server to run with "
                            "--api-key (the routes read local folders); --lora-adapters loads them at start",
                       "forbidden")
    return server


def _under_lora_root(server: ServerState, lora_path: str) -> str:
    """`lora_path` (absolute, or relative to --lora-root) once resolved, links included, if it lies in
    --lora-root: a request never makes the server read a folder the operator did not hand over."""
    root = server.config.lora_root
    if not root:
        raise ApiError(403, "loading LoRA adapters over HTTP needs --lora-root, the folder they may be read "
                            "from", "forbidden", "lora_path")
    root_path = Path(root).resolve()
    path = (root_path / lora_path).resolve()
    if not path.is_relative_to(root_path):
        raise ApiError(403, f"`lora_path` {lora_path!r} is outside --lora-root", "forbidden", "lora_path")
    return str(path)


@router.post("/v1/load_lora_adapter", summary="Load a PEFT LoRA adapter and serve it by name")
async def load_lora_adapter(body: LoadLoRAAdapter, http: Request) -> PlainTextResponse:
    server = _admin(http)
    path = _under_lora_root(server, body.lora_path)
    await server.ready_engine().load_adapter(body.lora_name, path)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", summary="Stop serving a LoRA adapter (running requests finish)")
async def unload_lora_adapter(body: UnloadLoRAAdapter, http: Request) -> PlainTextResponse:
    running = await _admin(http).ready_engine().unload_adapter(body.lora_name)
    note = f" ({running} running requests finish with it first)" if running else ""
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.{note}")


def adapter_for_model(engine: Engine, model: str | None) -> str | None:
    """An OpenAI-style `model` naming a loaded adapter selects it; any other name means the base
    model, since SDKs send whatever name they were given ("dummy", "tgi", ...)."""
    return model if engine.has_adapter(model) else None


def adapter_cards(engine: Engine, base_card: dict) -> list[dict]:
    """/v1/models entries of the loaded adapters, vLLM-style: the base model's card with the adapter's
    name as `id`, its folder as `root` and the base model as `parent`."""
    return [{**base_card, "id": a.name, "root": a.path, "parent": base_card["id"]} for a in engine.list_adapters()]
