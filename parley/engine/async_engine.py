"""The asyncio facade over the engine: the one engine object the HTTP layer talks to.

The engine loop runs in its own thread (torch releases the GIL in its kernels), so the event loop
serving HTTP never waits on a forward pass. Each request gets an async iterator of events;
closing it early aborts the request and frees its KV blocks at the engine's next step.
LoRA adapters are read off the event loop and registered on the engine thread, between steps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future
from typing import AsyncIterator

import torch

from parley.adapters.batch import LoRABatcher
from parley.adapters.lora import load_lora
from parley.adapters.registry import LoRARegistry
from parley.config import EngineConfig, ModelConfig
from parley.engine.backlog import PromptBacklog
from parley.engine.block_manager import BlockManager, kv_layout
from parley.engine.core import EngineCore
from parley.engine.drafts import MAX_DRAFT_TOKENS
from parley.engine.request import PreparedRequest, Sink
from parley.engine.runner import ModelRunner
from parley.engine.malloc import keep_freed_memory, release_freed_memory
from parley.engine.scheduler import Scheduler
from parley.engine.threads import ThreadTuner
from parley.engine.validation import Limits, prepare, tokenize_prompt
from parley.kernels.linear import QuantWeight, projection_kernel
from parley.models.attention import kernel_serves
from parley.models.layers.decoder import DecoderLayer
from parley.models.loader import default_model_path, load_model
from parley.sampling.sampler import Sampler
from parley.structured import GrammarCompiler
from parley.tokenization.chat_template import ChatTemplate
from parley.tokenization.infill import find_infill
from parley.tokenization.reasoning import find_reasoning
from parley.tokenization.tokenizer import load_tokenizer
from parley.tools.format import model_format
from parley.types import AdapterInfo, EngineInfo, EngineStats, FinalEvent, GenerationRequest, TokenEvent

log = logging.getLogger("parley.engine")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_TOTAL_TOKENS = 4096
DEFAULT_KV_CACHE_TOKENS = 32768  # 720 MiB for SmolLM2 in bf16: 8 full-length sequences
SWITCH_INTERVAL_S = 0.0005  # how long the engine thread waits for the GIL before it claims it (see start)
LONG_PROMPT_CHARS = 10_000  # tokenized off the event loop beyond this (~3 ms here; 100k: 30 ms)


def _bits_free_of_threads(model, model_config: ModelConfig, config: EngineConfig, lora: LoRABatcher) -> bool:
    """Whether a step's outputs keep their bits on any number of threads: where every projection
    (the lm_head too) runs on the 4/8-bit kernel and the attention and LoRA on theirs, in bfloat16,
    each of which computes a row on one thread; not through oneDNN or torch, whose bits were only
    checked against the number of rows (parley/kernels/linear.py)."""
    projections = [getattr(layer, name, None) for layer in model.layers for name in DecoderLayer.PROJECTIONS]
    dtype, device = DTYPES[config.dtype], torch.device(config.device)
    return (dtype == torch.bfloat16 and lora.segmented
            and all(isinstance(w, QuantWeight) for w in [*projections, model.lm_head_packed])
            and kernel_serves(device, dtype, model_config.num_heads, model_config.num_kv_heads, model_config.head_dim,
                              config.block_size))


def served_model_id(config: EngineConfig, model_path: str) -> str:
    return config.model_id or os.path.basename(model_path)


class AsyncEngine:
    """The `parley.types.Engine` the HTTP layer talks to (`config`, `tokenizer`, `core`... are for
    the engine's own tests and tools)."""

    def __init__(self, config: EngineConfig, core: EngineCore, tokenizer, chat_template: ChatTemplate,
                 model_config: ModelConfig, limits: Limits, model_path: str, grammar_compiler=None):
        self.config = config
        self.core = core
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.model_config = model_config
        self.limits = limits
        self.model_path = model_path
        self.model_id = served_model_id(config, model_path)
        self.grammar_compiler = grammar_compiler
        self.info = EngineInfo(
            self.model_id, str(DTYPES[config.dtype]), str(config.device), config.max_input_tokens,
            config.max_total_tokens, config.max_batch_total_tokens, config.max_batch_size,
            config.max_concurrent_requests, config.max_best_of, config.max_stop_sequences, config.max_top_n_tokens,
            config.waiting_served_ratio, config.max_waiting_tokens, tokenizer.chat_template,
            frozenset(chat_template.variables), find_reasoning(tokenizer),
            model_format(chat_template, tokenizer.chat_template, self._special_token_id), find_infill(tokenizer))
        self.adapters: LoRARegistry = core.adapters
        self._adapter_requests: Counter[str] = Counter()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self.backlog = PromptBacklog(config.max_queued_tokens)

    @classmethod
    def load(cls, config: EngineConfig) -> "AsyncEngine":
        """Builds the engine on its own thread, which then runs the engine loop once started, so every
        torch call of the engine happens on that one thread. Measured here: the same steps ran 2x
        slower when OpenMP had first been driven by another thread (the loader)."""
        built: Future = Future()

        def engine_main() -> None:
            try:
                engine = cls._build(config)
            except BaseException as exc:
                built.set_exception(exc)
                return
            built.set_result(engine)
            engine._started.wait()
            engine.core.run_forever(engine.config.num_threads)

        thread = threading.Thread(target=engine_main, name="parley-engine", daemon=True)
        thread.start()
        engine = built.result()
        engine._thread = thread
        return engine

    @classmethod
    def _build(cls, config: EngineConfig) -> "AsyncEngine":
        if config.dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {config.dtype!r}; choose one of {', '.join(DTYPES)}")
        if config.quantize not in (None, "int4"):
            raise ValueError(f"unsupported quantize {config.quantize!r}; Parley has int4")
        if config.quantize and torch.device(config.device).type != "cpu":
            raise ValueError("quantize int4 runs on the CPU only")
        if not 0 <= config.speculate <= MAX_DRAFT_TOKENS:
            raise ValueError(f"speculate must be 0 to {MAX_DRAFT_TOKENS}, not {config.speculate}")
        threads = config.num_threads or os.cpu_count() or 1
        torch.set_num_threads(threads)
        keep_freed_memory()
        device = torch.device(config.device)
        path = config.model_id or default_model_path()
        started = time.monotonic()
        model, model_config = load_model(path, DTYPES[config.dtype], device, config.quantize)
        release_freed_memory()
        tokenizer = load_tokenizer(path)
        chat_template = ChatTemplate(tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)  # None: ChatML

        max_total = config.max_total_tokens or min(model_config.max_position_embeddings, DEFAULT_MAX_TOTAL_TOKENS)
        max_input = config.max_input_tokens or max_total - 1
        if not 0 < max_input < max_total:
            raise ValueError(f"max_input_tokens ({max_input}) must be below max_total_tokens ({max_total})")
        if max_total > model_config.max_position_embeddings:
            raise ValueError(f"max_total_tokens ({max_total}) exceeds the model's context "
                             f"({model_config.max_position_embeddings})")
        kv_tokens = config.max_batch_total_tokens or max(DEFAULT_KV_CACHE_TOKENS, max_total)
        if kv_tokens < max_total:
            raise ValueError(f"max_batch_total_tokens ({kv_tokens}) must hold one full sequence ({max_total})")
        num_blocks = -(-kv_tokens // config.block_size)
        config = dataclasses.replace(config, num_threads=threads, max_input_tokens=max_input,
                                     max_total_tokens=max_total, max_batch_total_tokens=num_blocks * config.block_size)

        sampler = Sampler(model_config.vocab_size, device, config.watermark_gamma, config.watermark_delta)
        adapters = LoRARegistry(base_name=served_model_id(config, path))
        layout = kv_layout(model_config, num_blocks, config.block_size, config.max_batch_size,
                           config.max_batch_prefill_tokens)
        runner = ModelRunner(model, model_config, sampler, num_blocks=num_blocks, block_size=config.block_size,
                             dtype=DTYPES[config.dtype], device=device,
                             lora=LoRABatcher(adapters, model_config, device, DTYPES[config.dtype]), layout=layout)
        scheduler = Scheduler(BlockManager(num_blocks, config.block_size, layout), max_batch_size=config.max_batch_size,
                              max_batch_prefill_tokens=config.max_batch_prefill_tokens)
        grammar_compiler = GrammarCompiler(tokenizer.backend, tokenizer.eos_token_ids, model_config.vocab_size)
        tuner = ThreadTuner(threads) if config.adapt_threads and threads > 1 and _bits_free_of_threads(
            model, model_config, config, runner.lora) else None
        core = EngineCore(scheduler, runner, tokenizer, model_config.vocab_size, adapters, tuner, config.speculate)
        limits = Limits(max_input, max_total, config.max_stop_sequences, config.max_top_n_tokens,
                        max(config.max_n, config.max_best_of), model_config.vocab_size)
        log.info("engine ready in %.1fs: %s (%s%s, %s, %d threads%s), KV cache %d blocks x %d tokens (%.0f MiB), "
                 "projections on %s, LoRA on %s", time.monotonic() - started, path, config.dtype,
                 ", int4 projections" if config.quantize else "", device, threads,
                 ", fewer while other processes hold cores" if tuner else "", num_blocks,
                 config.block_size, runner.kv_cache_bytes / 2**20, projection_kernel(model.layers[0].qkv_weight),
                 "the CPU kernel" if runner.lora.segmented else "stacked matmuls")
        engine = cls(config, core, tokenizer, chat_template, model_config, limits, path, grammar_compiler)
        for name, adapter_path in config.lora_adapters:
            adapters.add(engine._read_adapter(name, adapter_path))
        return engine

    def start(self) -> None:
        # The engine thread's Python between two steps (outputs, schedule, inputs) is the step's
        # critical path, and the event loop's thread takes the GIL from it each time a step's
        # tokens arrive: at concurrency 8 the engine thread waited ~1.2 ms a 11 ms step for it
        # (perf sched, AMD EPYC Zen 4), longer than the loop's own ~0.5 ms of CPU, as the loop
        # holds it while the clients it wakes run. A thread that has waited the switch interval
        # for the GIL makes its holder let go: 0.5 ms against CPython's 5 gave over HTTP (servers
        # with each alternated, 11 pairs) a median of +7% at concurrency 8, the same at 1 and 32.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        self._started.set()

    async def shutdown(self) -> None:
        if self._thread is not None:
            self.core.stop()
            self._started.set()
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self.grammar_compiler is not None:
            self.grammar_compiler.close()

    def _special_token_id(self, text: str) -> int | None:
        token = self.tokenizer.backend.token_to_id(text)
        return token if token in self.tokenizer.special_ids else None

    # -- prompts ------------------------------------------------------------------------------
    def render(self, messages: list[dict], continue_final_message: bool = False, **variables) -> str:
        return self.chat_template.render(messages, continue_final_message=continue_final_message, **variables)

    async def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        """Off the event loop when long (a 100k-character prompt takes ~30 ms here)."""
        if len(text) > LONG_PROMPT_CHARS:
            return await asyncio.to_thread(tokenize_prompt, self.tokenizer, text, add_special_tokens)
        return tokenize_prompt(self.tokenizer, text, add_special_tokens)

    def tokenize_with_offsets(self, text: str, add_special_tokens: bool) -> list[tuple[int, int, int]]:
        return self.tokenizer.encode_with_offsets(text, add_special_tokens=add_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        return self.tokenizer.token_bytes(token_id)

    # -- requests -----------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | FinalEvent]:
        """Events of all `request.n` sequences, interleaved; one FinalEvent per sequence, then the end.
        How many requests run at once is the caller's to bound (the HTTP layer's admission)."""
        is_base = request.adapter_id in (None, "", self.model_id)
        adapter = None if is_base else self.adapters.lookup(request.adapter_id)  # NotFoundError naming it
        prepared = await self._prepare(request)
        queued = len(prepared.prompt_ids)
        self.backlog.admit(queued)  # OverloadedError past --max-queued-tokens
        if adapter is not None:
            prepared.lora_id, prepared.cache_salt = adapter.lora_id, adapter.cache_salt
            self._adapter_requests[adapter.name] += 1
        if request.cache_salt is not None:  # a namespace of its own within the adapter's (or the base model's)
            prepared.cache_salt = hash((prepared.cache_salt, "salt", request.cache_salt))
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.core.submit(prepared, Sink(loop, events.put_nowait))
        remaining = len(prepared.seeds)
        try:
            while remaining:
                item = await events.get()
                if queued:  # the first event: the prompt is prefilled (or the request failed)
                    self.backlog.drained(queued, prefilled=not isinstance(item, BaseException))
                    queued = 0
                if isinstance(item, BaseException):
                    remaining = 0  # the engine already dropped the request
                    raise item
                for event in item:
                    if isinstance(event, FinalEvent):
                        remaining -= 1
                    yield event
        finally:
            if queued:  # left before its prompt was prefilled
                self.backlog.drained(queued, prefilled=False)
            if remaining:
                self.core.abort(request.request_id)

    async def _prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Tokenizes and validates `request`, off the event loop when that may take long: compiling
        a grammar (up to a second for a large schema) or tokenizing a long prompt would stall every
        stream the loop serves. No torch runs there (see `_read_adapter_off_the_engine_thread`)."""
        args = (request, self.tokenizer, self.limits, self.grammar_compiler)
        long_prompt = isinstance(request.prompt, str) and len(request.prompt) > LONG_PROMPT_CHARS
        if request.grammar is not None or long_prompt:
            return await asyncio.to_thread(prepare, *args)
        return prepare(*args)

    @property
    def failure(self) -> str | None:
        """Why the engine loop stopped, if it did: it then serves nothing more (/health says 503)."""
        error = self.core.fatal_error
        return None if error is None else f"{type(error).__name__}: {error}"

    def stats(self) -> EngineStats:
        """Read from another thread than the engine's: each list is copied once (in one C call, under
        the GIL), so the numbers are of one moment or two close ones, never an error."""
        scheduler = self.core.scheduler
        blocks = scheduler.blocks
        running, waiting = tuple(scheduler.running), tuple(scheduler.waiting)
        running_requests = len({id(seq.group) for seq in running})
        names = self.adapters.names_by_id()

        def adapters(sequences) -> tuple[str, ...]:
            return tuple(sorted({names[s.lora_id] for s in sequences if s.lora_id in names}))

        return EngineStats(blocks.num_used_blocks, blocks.num_blocks, len(waiting), len(running),
                           dict(self._adapter_requests), self.core.num_generated_tokens,
                           scheduler.num_prompt_tokens_admitted, scheduler.num_prompt_tokens_cached,
                           requests_waiting=max(0, len(self.core.requests) - running_requests),
                           requests_running=running_requests, adapters_loaded=len(self.adapters.loaded),
                           running_adapters=adapters(running), waiting_adapters=adapters(waiting),
                           max_adapters_per_batch=self.config.max_batch_size, compute_threads=self.core.compute_threads,
                           draft_tokens=self.core.output.num_draft_tokens,
                           draft_accepted_tokens=self.core.output.num_accepted_tokens)

    # -- LoRA adapters -------------------------------------------------------------------------
    def has_adapter(self, name: str | None) -> bool:
        return name in self.adapters.loaded

    def list_adapters(self) -> list[AdapterInfo]:
        return [AdapterInfo(a.name, a.weights.path, a.weights.rank) for a in self.adapters.loaded.values()]

    async def load_adapter(self, name: str, path: str) -> None:
        """Read a PEFT LoRA folder and serve it as `name`; AdapterError (422) says what is wrong."""
        self.adapters.check_name(name)  # before reading any file; checked again when added
        weights = await asyncio.to_thread(self._read_adapter_off_the_engine_thread, name, path)
        await self._on_engine_thread(lambda: self.adapters.add(weights))
        log.info("LoRA adapter %r loaded from %s (rank %d)", name, path, weights.rank)

    async def unload_adapter(self, name: str) -> int:
        """Stop serving `name` (NotFoundError if not loaded). Requests already running with it finish
        first; returns how many there are."""
        running = await self._on_engine_thread(lambda: self.adapters.remove(name))
        log.info("LoRA adapter %r unloaded (%d running requests finish with it)", name, running)
        return running

    def _read_adapter(self, name: str, path: str):
        return load_lora(name, path, self.model_config, max_rank=self.config.max_lora_rank,
                         dtype=DTYPES[self.config.dtype], device=self.config.device, served_model=self.model_id)

    def _read_adapter_off_the_engine_thread(self, name: str, path: str):
        # Torch ops on a second thread start a second OpenMP team, which then fights the engine's
        # for the cores: after one adapter load the engine ran 2x slower for good (bench/lora.py,
        # base only: 371 -> 678 tok/s with this line). One thread here makes no team at all.
        torch.set_num_threads(1)  # per calling thread
        return self._read_adapter(name, path)

    async def _on_engine_thread(self, fn):
        if self._thread is None:  # no engine thread: no step to race with
            return fn()
        return await asyncio.wrap_future(self.core.call(fn))

