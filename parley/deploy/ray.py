"""Parley on Ray Serve: N replicas of the whole server behind Ray Serve's HTTP proxy.

    serve run parley.deploy.ray:app model_id=/models/qwen num_replicas=2

(or `serve deploy deploy/ray-serve.yaml`). Two deployments make the application:

- `ParleyReplica`: one engine per replica, loaded in its constructor (Ray routes nothing to a
  replica before it is ready), running Parley's own FastAPI app in process (parley.deploy.asgi):
  every route answers as `parley serve` answers it, /metrics with that replica's numbers.
- `ParleyIngress`: what Ray's proxy calls. It reads the body, takes the prompt text out of it
  (parley.deploy.routing) and sends the request through a DeploymentHandle to the replicas, whose
  router (parley.deploy.router.PrefixAffinityRouter, Ray Serve's request-router extension point)
  can see the prompt: with Ray's proxy calling the replicas directly, a router sees only the
  headers, the body being streamed to the replica afterwards.

Every answer says which replica gave it (`x-parley-replica`); a request carrying that header goes to
that replica (to read one replica's /metrics, say). When every replica is full and Ray's queue
for them too (`max_ongoing_requests`, `max_queued_requests`), the client gets Parley's 429 with
Retry-After at once. A replica that dies mid-stream ends its streams with an error event; a request
it had not begun to answer goes to another replica (a 503 if every one tried died); Ray restarts it.

The builder's arguments are `parley serve`'s flags, named as their config fields (model_id,
max_batch_total_tokens, served_model_name, ...), plus Ray's: see RAY_ARGS.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
from typing import Any, AsyncIterator

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from parley.api import create_app
from parley.api.errors import ANTHROPIC_PREFIX, ApiError, error_body, error_response
from parley.api.serving import too_large
from parley.api.sse import frame
from parley.cli import ENGINE_FLAGS, SERVER_FLAGS, configs, load_engine
from parley.config import EngineConfig, ServerConfig
from parley.deploy.asgi import HttpCall, ResponseStart, run_asgi
from parley.deploy.routing import prompt_text

log = logging.getLogger("parley.deploy")

REPLICA_HEADER = "x-parley-replica"
DEATH_RETRIES = 2  # times a request whose replica died before answering is sent to another

# Ray's settings: name -> (type, default, help). `num_replicas` is fixed unless min_replicas or
# max_replicas is given: then Ray scales between them on ongoing requests per replica.
RAY_ARGS: dict[str, tuple[Any, Any, str]] = {
    "num_replicas": (int, 1, "replicas, each a whole Parley engine (without min/max_replicas)"),
    "min_replicas": (int, None, "autoscaling: fewest replicas (default 1 when max_replicas is given)"),
    "max_replicas": (int, None, "autoscaling: most replicas (default min_replicas)"),
    "target_ongoing_requests": (float, 4.0, "autoscaling: ongoing requests per replica Ray scales to keep"),
    "upscale_delay_s": (float, None, "autoscaling: seconds the load must stay high before a replica is added "
                                     "(Ray's default: 30)"),
    "downscale_delay_s": (float, None, "autoscaling: ... stay low before one is removed (Ray's default: 600)"),
    "look_back_period_s": (float, None, "autoscaling: seconds the load is averaged over (Ray's default: 30)"),
    "max_ongoing_requests": (int, None, "requests one replica runs at once (default --max-concurrent-requests)"),
    "max_queued_requests": (int, None, "requests the ingress holds for busy replicas before answering 429 "
                                       "(default max_ongoing_requests; -1: no limit)"),
    "num_cpus": (float, 1.0, "CPUs Ray reserves per replica (and its torch threads, unless num_threads)"),
    "num_gpus": (float, 0.0, "GPUs Ray reserves per replica"),
    "ingress_replicas": (int, 1, "replicas of the ingress (it only reads bodies and forwards them; each keeps its own "
                                "prefix table)"),
    "router": (str, "prefix", "prefix (prefix-cache affinity, parley.deploy.router) | power_of_two (Ray's default)"),
    "min_prefix_chars": (int, 256, "prefix router: shortest shared prompt prefix worth following, in characters"),
    "imbalance": (int, 4, "prefix router: ongoing requests a prefix's replica may run above the least loaded"),
}
AUTOSCALING_DELAYS = ("upscale_delay_s", "downscale_delay_s", "look_back_period_s")
# flags of `parley serve` that mean nothing here, and why
REFUSED = {
    "hostname": "Ray Serve's proxy binds the address: `serve run --host`, or http_options in the config file",
    "port": "Ray Serve's proxy binds the port: `serve run --port`, or http_options in the config file",
    "drain_timeout": "Ray Serve drains a replica itself: graceful_shutdown_timeout_s in the config file",
}
LIST_ARGS = ("cors_allow_origin", "served_model_name")  # a list, or a comma-separated string


def _flag_table() -> dict[str, Any]:
    table = {flag[2:].replace("-", "_"): kind for flag, (kind, _) in {**ENGINE_FLAGS, **SERVER_FLAGS}.items()}
    return {**table, "no_playground": _boolean}


def _boolean(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError(f"not a boolean: {value!r}")
    return text in ("1", "true", "yes")


def parse_args(args: dict[str, Any]) -> tuple[EngineConfig, ServerConfig, dict[str, Any]]:
    """The builder's arguments as Parley's configs and Ray's settings; any argument that is not
    one of them, or whose value is not of its type, is a ValueError naming it."""
    flags, ray_args = _flag_table(), {name: default for name, (_, default, _) in RAY_ARGS.items()}
    namespace = argparse.Namespace(**{name: None for name in flags}, **{name: None for name in LIST_ARGS})
    for name, value in args.items():
        try:
            if name in REFUSED:
                raise ValueError(REFUSED[name])
            if name in RAY_ARGS:
                ray_args[name] = RAY_ARGS[name][0](value)
            elif name in LIST_ARGS:
                setattr(namespace, name, [str(v) for v in value] if isinstance(value, list) else str(value).split(","))
            elif name in flags:
                kind = flags[name]
                setattr(namespace, name, value if isinstance(value, bool) and kind is _boolean else kind(str(value)))
            else:
                known = sorted([*flags, *LIST_ARGS, *RAY_ARGS])
                raise ValueError(f"not a setting of Parley or of its Ray deployment (these are: {', '.join(known)})")
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise ValueError(f"argument {name}={value!r}: {exc}") from None
    autoscaling = ray_args["min_replicas"] is not None or ray_args["max_replicas"] is not None
    scaling = [name for name in AUTOSCALING_DELAYS if ray_args[name] is not None]
    if scaling and not autoscaling:
        raise ValueError(f"argument {scaling[0]}: only with min_replicas or max_replicas (autoscaling)")
    if autoscaling and "num_replicas" in args:
        raise ValueError("argument num_replicas: not with min_replicas or max_replicas, between which Ray "
                         "chooses the number of replicas itself")
    if ray_args["router"] not in ("prefix", "power_of_two"):
        raise ValueError(f"argument router={ray_args['router']!r}: must be prefix or power_of_two")
    if namespace.num_threads is None:  # one torch thread per CPU Ray gives the replica, not every core
        namespace.num_threads = max(1, math.floor(ray_args["num_cpus"]))
    engine, server = configs(namespace)
    return engine, server, ray_args


class ParleyReplica:
    """One Parley server: its engine loads in the constructor, so Ray routes to it only once ready."""

    async def __init__(self, engine_config: EngineConfig, server_config: ServerConfig):
        failed: asyncio.Future = asyncio.get_running_loop().create_future()
        self.app = create_app(server_config, engine_config, lambda: load_engine(engine_config),
                              lambda exc: failed.done() or failed.set_result(exc))
        self.state = self.app.state.server
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # starts loading the engine on its thread
        while self.state.engine is None:
            if failed.done():
                raise RuntimeError(f"Parley's engine failed to load: {failed.result()}")
            await asyncio.sleep(0.05)

    async def handle(self, call: HttpCall, prompt: str | None = None,
                     replica: str | None = None) -> AsyncIterator[ResponseStart | bytes]:
        """The answer to `call`, as Parley's app gives it (`prompt` is the router's, `replica` a pin)."""
        if replica and replica != self.replica_id:
            err = ApiError(404, f"No replica {replica!r} ({REPLICA_HEADER}): it may have been replaced; "
                           f"this is {self.replica_id}", "not_found")
            response = error_response(call.path, err)
            yield ResponseStart(response.status_code, response.raw_headers)
            yield response.body
            return
        async for part in run_asgi(self.app, call):
            if isinstance(part, ResponseStart):
                part.headers.append((REPLICA_HEADER.encode(), self.replica_id.encode()))
            yield part

    def check_health(self) -> None:
        """Ray restarts a replica whose engine stopped (its loop failed)."""
        engine = self.state.engine
        if engine is None or engine.failure:
            raise RuntimeError(f"Parley's engine stopped: {engine.failure if engine else 'not loaded'}")

    async def __del__(self) -> None:
        """Ray's graceful shutdown: the engine stops as `parley serve`'s does."""
        if hasattr(self, "_lifespan"):  # not if the constructor failed before entering it
            await self._lifespan.__aexit__(None, None, None)


class ParleyIngress:
    """What Ray's HTTP proxy calls: forwards each request to a replica chosen by the router,
    passing the prompt text along, and streams the answer back."""

    def __init__(self, replicas: DeploymentHandle, server_config: ServerConfig):
        self.replicas = replicas.options(stream=True)
        self.payload_limit = server_config.payload_limit

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.payload_limit:  # refused unread, as by a single server
            return error_response(path, too_large(self.payload_limit))
        body = await request.body()
        if len(body) > self.payload_limit:  # the replica would refuse it too: no need to ship it there
            return error_response(path, too_large(self.payload_limit))
        call = HttpCall(request.method, path, request.scope.get("query_string", b""), list(request.scope["headers"]),
                        body, request.scope.get("client"), request.url.scheme)
        prompt, pinned = prompt_text(body), request.headers.get(REPLICA_HEADER)
        for attempt in range(DEATH_RETRIES + 1):
            answer = self.replicas.handle.remote(call, prompt=prompt, replica=pinned)
            try:
                start = await answer.__anext__()
                break
            except BackPressureError as exc:
                retry_after = max(1, math.ceil(exc.retry_after_s or 1))
                return error_response(path, ApiError(429, "Model is overloaded: every replica is busy and the "
                                                     "queue for them is full", "overloaded", retry_after=retry_after))
            except (RayActorError, ActorUnavailableError) as exc:
                # nothing was generated yet: another replica can answer it (Ray drops the dead one)
                log.warning("%s %s: the replica died before answering (attempt %d): %s", request.method, path,
                            attempt + 1, exc)
        else:
            return error_response(path, ApiError(503, "The replicas serving this request died before answering; "
                                                 "retry", "unhealthy"), {"Retry-After": "1"})
        response = StreamingResponse(_rest(answer, path, start))
        response.status_code, response.raw_headers = start.status, start.headers
        return response


async def _rest(answer, path: str, start: ResponseStart) -> AsyncIterator[bytes]:
    """The body after the ResponseStart. If the replica dies mid-stream, an SSE stream ends with an
    error event in the route's dialect (the status was sent already); other bodies end short. A body
    of known length ends with its last byte: the replica's end of stream, which would follow, is lost
    if it dies in between, and the answer is whole."""
    declared = start.header(b"content-length")
    remaining = int(declared) if declared is not None and declared.isdigit() else None
    try:
        if remaining == 0:  # /health's empty 200
            return
        async for chunk in answer:
            yield chunk
            if remaining is not None:
                remaining -= len(chunk)
                if remaining <= 0:
                    return
    except (RayActorError, ActorUnavailableError) as exc:
        log.warning("%s: the replica died mid-answer: %s", path, exc)
        if not (start.header(b"content-type") or b"").startswith(b"text/event-stream"):
            raise
        err = ApiError(503, "The replica serving this request died; the answer is incomplete: retry", "unhealthy")
        yield frame(error_body(path, err), named=path.startswith(ANTHROPIC_PREFIX))
    finally:
        answer.cancel()  # the client went away (or the stream ended): nothing more to make


def build(args: dict[str, Any]):
    """The application `serve run parley.deploy.ray:app key=value ...` starts (see RAY_ARGS)."""
    engine_config, server_config, ray_args = parse_args(args)
    max_ongoing = ray_args["max_ongoing_requests"] or engine_config.max_concurrent_requests
    max_queued = ray_args["max_queued_requests"] if ray_args["max_queued_requests"] is not None else max_ongoing
    options: dict[str, Any] = {
        "max_ongoing_requests": max_ongoing,
        "max_queued_requests": max_queued,
        "ray_actor_options": {"num_cpus": ray_args["num_cpus"], "num_gpus": ray_args["num_gpus"]},
        "health_check_period_s": 5,
    }
    low, high = ray_args["min_replicas"], ray_args["max_replicas"]
    if low is not None or high is not None:
        low = 1 if low is None else low
        delays = {name: ray_args[name] for name in AUTOSCALING_DELAYS if ray_args[name] is not None}
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=low, max_replicas=high if high is not None else low,
            target_ongoing_requests=ray_args["target_ongoing_requests"], **delays)
    else:
        options["num_replicas"] = ray_args["num_replicas"]
    if ray_args["router"] == "prefix":
        options["request_router_config"] = RequestRouterConfig(
            request_router_class="parley.deploy.router:PrefixAffinityRouter",
            request_router_kwargs={"min_prefix_chars": ray_args["min_prefix_chars"],
                                   "imbalance": ray_args["imbalance"]})
    replicas = serve.deployment(ParleyReplica, name="ParleyReplica", **options).bind(engine_config, server_config)
    # the ingress only forwards: no CPU of its own reserved, and room for every replica's requests
    ingress_limit = max_ongoing * (high or ray_args["num_replicas"]) + max(max_queued, 0) + 100
    return serve.deployment(ParleyIngress, name="ParleyIngress", num_replicas=ray_args["ingress_replicas"],
                            max_ongoing_requests=ingress_limit, ray_actor_options={"num_cpus": 0}
                            ).bind(replicas, server_config)


app = build
