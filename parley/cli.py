"""`parley serve`: flags named like TGI's launcher; each also read from its environment variable
(MODEL_ID, PORT, MAX_TOTAL_TOKENS, ...; see parley/config.py). Flags win over the environment."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from typing import Callable

from parley.config import EngineConfig, ServerConfig, parse_bool, parse_lora_adapters

log = logging.getLogger("parley")

# flag -> (type, help); the flag's name is the config field's; every flag defaults to None so the
# environment applies
ENGINE_FLAGS = {
    "--model-id": (str, "local HF model folder or .gguf file (default: the bundled SmolLM2-135M-Instruct)"),
    "--dtype": (str, "bfloat16 | float16 | float32"),
    "--device": (str, "torch device, e.g. cpu or cuda"),
    "--num-threads": (int, "torch threads for the engine (default: all cores)"),
    "--adapt-threads": (parse_bool, "true (default): while other processes hold cores, decode on fewer threads when "
                                    "that is measured faster (4- and 8-bit bfloat16 models, whose outputs do not "
                                    "depend on it) | false: always --num-threads"),
    "--max-concurrent-requests": (int, "requests in flight before answering 429"),
    "--max-queued-tokens": (int, "prompt tokens waiting for prefill before answering 429 (default 32768; a "
                                 "request arriving to an empty queue is always taken)"),
    "--max-input-tokens": (int, "longest prompt, in tokens"),
    "--max-total-tokens": (int, "longest prompt + output, in tokens"),
    "--max-batch-prefill-tokens": (int, "prompt tokens per engine step"),
    "--max-batch-total-tokens": (int, "KV-cache size, in tokens"),
    "--max-best-of": (int, "largest best_of"),
    "--max-stop-sequences": (int, "most stop sequences per request"),
    "--max-top-n-tokens": (int, "largest top_n_tokens / top_logprobs"),
    "--max-batch-size": (int, "sequences decoded together in one step"),
    "--watermark-gamma": (float, "share of the vocabulary on a watermark's green list"),
    "--watermark-delta": (float, "logit bias added to green-list tokens when a request asks for a watermark"),
    "--lora-adapters": (parse_lora_adapters, "LoRA adapters (PEFT folders) served from the start: name=path,..."),
    "--max-lora-rank": (int, "largest LoRA rank an adapter may have (default 64)"),
    "--quantize": (str, "int4: 4-bit weights for the decoder's projections, in groups of 32 as GGUF Q4_1 "
                        "(a Q4_0/Q4_1/Q8_0 GGUF runs its matrices from their bits anyway, in bfloat16)"),
    "--speculate": (int, "draft tokens per step (0-8, default 0: none) looked up in each request's own prompt and "
                         "output, verified so that the output is unchanged: faster when answers repeat or quote"),
}
SERVER_FLAGS = {
    "--hostname": (str, "address to bind (default 127.0.0.1)"),
    "--port": (int, "port to listen on (default 8080)"),
    "--max-client-batch-size": (int, "most prompts in one /v1/completions request"),
    "--payload-limit": (int, "largest request body, in bytes (default 2000000; 413 past it)"),
    "--drain-timeout": (float, "seconds requests in flight get to finish after SIGTERM (default 30)"),
    "--lora-root": (str, "the only folder /v1/load_lora_adapter may read adapters from (with --api-key)"),
    "--api-key": (str, "require `Authorization: Bearer KEY` (or `api-key: KEY`) on every route but /health"),
    "--status-interval": (float, "seconds between the console's status lines while busy: requests running and "
                                 "waiting, tok/s, KV-cache use (default 10; 0: none)"),
    "--otlp-endpoint": (str, "send each request's trace (queue, prefill, decode) to this OTLP/HTTP collector, e.g. "
                              "http://127.0.0.1:4318 (needs pip install 'parley[otel]')"),
    "--otlp-service-name": (str, "the service.name of the traces (default parley)"),
    "--unknown-fields": (lambda value: _one_of(value, ("refuse", "ignore")), "refuse (default: 400, or 422 on TGI's routes, naming a body field Parley does "
                              "not know) | ignore (for clients that send fields of their own)"),
    "--reasoning-format": (lambda value: _one_of(value, ("auto", "none")), "auto (default: a thinking model's reasoning "
                           "goes to reasoning_content, apart from the answer) | none (it stays in the content, "
                           "<think> tags and all); a request's parse_reasoning decides for itself"),
}


def _one_of(value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(allowed)}, not {value!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parley", description="Parley LLM inference server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the model over HTTP (TGI and OpenAI APIs)")
    for flag, (kind, help_text) in {**ENGINE_FLAGS, **SERVER_FLAGS}.items():
        serve.add_argument(flag, type=kind, default=None, help=help_text)
    serve.add_argument("--cors-allow-origin", action="append", default=None,
                       help="allowed CORS origin; repeat the flag or separate with commas")
    serve.add_argument("--served-model-name", action="append", default=None,
                       help="a name OpenAI-style requests may give as `model` (repeat for aliases; the first is the "
                            "one answers report; default: the model's id); other names get 404")
    serve.add_argument("--no-playground", action="store_true", default=None,
                       help="do not serve the browser playground at GET / (environment: NO_PLAYGROUND=1)")
    return parser


def _options(args: argparse.Namespace, flags: dict) -> dict:
    return {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag in flags}


def configs(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    origins = [o.strip() for value in args.cors_allow_origin or [] for o in value.split(",") if o.strip()]
    engine = EngineConfig.from_env(**_options(args, ENGINE_FLAGS))
    server = ServerConfig.from_env(**_options(args, SERVER_FLAGS), cors_allow_origin=tuple(origins) or None,
                                   served_model_names=tuple(args.served_model_name or ()) or None,
                                   playground=False if args.no_playground else None)
    return engine, server


def load_engine(config: EngineConfig):
    from parley.engine.async_engine import AsyncEngine  # imports torch: done in the loading thread

    return AsyncEngine.load(config)


def serve(args: argparse.Namespace, engine_loader: Callable = load_engine) -> int:
    import uvicorn

    from parley.api import create_app

    class DrainingServer(uvicorn.Server):
        """On SIGTERM or Ctrl-C: /health and new requests answer 503 while the requests in flight
        finish, for up to --drain-timeout seconds; then uvicorn's own shutdown. A second signal
        stops at once."""

        async def serve(self, sockets=None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame) -> None:
            state = app.state.server
            if state.draining or not self.started:
                super().handle_exit(sig, frame)
                return
            state.draining = True
            log.info("draining: %d requests in flight get up to %.0f s to finish; new ones get 503",
                     state.admission.in_flight, server_config.drain_timeout)
            self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain(state)))

        async def _drain(self, state) -> None:
            deadline = time.monotonic() + server_config.drain_timeout
            while state.admission.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            self.should_exit = True

    engine_config, server_config = configs(args)
    failures: list[BaseException] = []

    def on_load_failure(exc: BaseException) -> None:
        failures.append(exc)
        server.should_exit = True

    try:
        app = create_app(server_config, engine_config, lambda: engine_loader(engine_config), on_load_failure)
    except (RuntimeError, ValueError) as exc:  # a setting that cannot work, e.g. --otlp-endpoint without the extra
        log.error("%s", exc)
        return 2
    server = DrainingServer(uvicorn.Config(app, host=server_config.hostname, port=server_config.port,
                                           log_level="info", timeout_graceful_shutdown=5))
    log.info("Parley listening on http://%s:%d; /health answers 503 until the model is loaded",
             server_config.hostname, server_config.port)
    server.run()
    return 1 if failures or not server.started else 0


def main(argv: list[str] | None = None, engine_loader: Callable | None = None) -> int:
    """`engine_loader(EngineConfig) -> engine` replaces the real engine (tests use a fake)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return serve(args, engine_loader or load_engine)


if __name__ == "__main__":
    sys.exit(main())
