"""Prometheus metrics under TGI's names, plus Parley's KV-cache gauges and per-adapter counts, and
the gauges an inference gateway routes by, as vLLM exports them (docs/API.md, "Metrics for a gateway").

Each server owns its own registry, so tests can build several apps. Counters are written under
their exact TGI names (`tgi_request_count`, not prometheus_client's `tgi_request_count_total`), so
they are rendered here by hand; gauges, and `parley_adapter_requests_total{adapter=...}` (counted
by the engine, which resolves adapter names), are read from the engine at scrape time.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from typing import TYPE_CHECKING, Callable, Mapping, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from parley.observability.tracing import RequestLife
from parley.types import FinalEvent

if TYPE_CHECKING:
    from parley.observability.tracing import Tracing

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class EngineGauges(Protocol):
    """What the engine reports at scrape time (its `stats()`)."""

    kv_blocks_used: int
    kv_blocks_total: int
    waiting: int
    running: int
    adapter_requests: dict[str, int]  # LoRA adapter name -> requests that used it
    generated_tokens: int  # tokens generated since the start
    prefix_cache_queried_tokens: int  # prompt tokens looked up in the prefix cache, one per sequence admitted
    prefix_cache_hit_tokens: int  # ... and found there
    requests_waiting: int  # requests, not sequences: what an inference gateway routes by
    requests_running: int
    adapters_loaded: int
    running_adapters: tuple[str, ...]
    waiting_adapters: tuple[str, ...]
    max_adapters_per_batch: int
    compute_threads: int  # the threads the engine's steps run on now
    draft_tokens: int  # draft tokens verified since the start
    draft_accepted_tokens: int  # ... and kept


class Metrics:
    COUNTERS = {
        "tgi_request_count": "Generation requests received",
        "tgi_request_success": "Generation requests answered in full",
        "parley_request_cancelled": "Generation requests whose client went away before the end",
    }

    def __init__(self, read_engine: Callable[[], EngineGauges | None] = lambda: None,
                 tracing: "Tracing | None" = None):
        """`tracing`: where each request's spans go (--otlp-endpoint), if anywhere."""
        self.tracing = tracing
        disable_created_metrics()  # no `*_created` series next to every histogram
        self.registry = CollectorRegistry(auto_describe=False)
        self.counts: Tally[str] = Tally()
        self.failures: Tally[str] = Tally()

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, buckets=buckets, registry=self.registry)

        self.duration = histogram("tgi_request_duration", "Request duration, arrival to last byte (s)",
                                  DURATION_BUCKETS)
        self.queue_duration = histogram("tgi_request_queue_duration", "Time waiting for the first step (s)",
                                        DURATION_BUCKETS)
        self.inference_duration = histogram("tgi_request_inference_duration",
                                            "Time from the first step to the end (s)", DURATION_BUCKETS)
        self.time_to_first_token = histogram("parley_time_to_first_token",
                                             "Arrival to the first generated token (s), streamed or not",
                                             DURATION_BUCKETS)
        self.time_per_token = histogram("tgi_request_mean_time_per_token_duration",
                                        "Inference time per generated token (s)", DURATION_BUCKETS)
        self.input_length = histogram("tgi_request_input_length", "Prompt tokens per request", TOKEN_BUCKETS)
        self.generated_tokens = histogram("tgi_request_generated_tokens", "Generated tokens per request",
                                          TOKEN_BUCKETS)
        self.registry.register(_EngineCollector(read_engine))

    def record_request(self, route: str = "", headers: Mapping[str, str] | None = None) -> "RequestRecord":
        """`route` and `headers` (a caller's traceparent) name the request's trace, when tracing."""
        self.counts["tgi_request_count"] += 1
        return RequestRecord(self, route, self.tracing.parent(headers) if self.tracing else None)

    # -- exposition ------------------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        lines = []
        for name, doc in self.COUNTERS.items():
            lines += [f"# HELP {name} {doc}", f"# TYPE {name} counter", f"{name} {self.counts[name]}"]
        lines += ["# HELP tgi_request_failure Generation requests that failed, by error type",
                  "# TYPE tgi_request_failure counter"]
        lines += [f'tgi_request_failure{{err="{err}"}} {n}' for err, n in sorted(self.failures.items())]
        return generate_latest(self.registry) + "\n".join(lines).encode() + b"\n", CONTENT_TYPE_LATEST


class RequestRecord:
    """One generation request's entry: the first of succeeded/failed/cancelled counts, later ones
    are ignored (several layers may see the same failure)."""

    def __init__(self, metrics: Metrics, route: str = "", trace_parent=None):
        self._metrics = metrics
        self._arrival = time.monotonic()
        self._arrival_ns = time.time_ns()  # the trace's clock
        self._done = False
        self._first_token_ns: int | None = None
        self._route, self._trace_parent = route, trace_parent
        self.user: str | None = None  # the request's end user, once its body is read (the trace's enduser.id)

    def first_token(self) -> None:
        """The request's first token came out of the engine (later calls are ignored)."""
        if self._first_token_ns is None:
            self._first_token_ns = time.time_ns()
            self._metrics.time_to_first_token.observe(time.monotonic() - self._arrival)

    def _finish(self) -> bool:
        first, self._done = not self._done, True
        return first

    def failed(self, error_type: str) -> None:
        if self._finish():
            self._metrics.failures[error_type] += 1
            self._trace(error_type)

    def cancelled(self) -> None:
        if self._finish():
            self._metrics.counts["parley_request_cancelled"] += 1
            self._trace("cancelled")

    def _trace(self, outcome: str, finals: list[list[FinalEvent]] | None = None) -> None:
        if self._metrics.tracing is None:
            return
        life = RequestLife(self._route, self._trace_parent, self._arrival_ns, time.time_ns(), outcome,
                           first_token_ns=self._first_token_ns, user=self.user)
        every = [f for group in finals or [] for f in group]
        if every:
            # the engine's queue time counts from its own arrival, a little after this one's
            life.first_step_ns = self._arrival_ns + round(min(f.queue_s for f in every) * 1e9)
            if self._first_token_ns is not None:
                life.first_step_ns = min(life.first_step_ns, self._first_token_ns)
            life.prompt_tokens = sum(group[0].prompt_tokens for group in finals if group)
            life.generated_tokens = sum(f.generated_tokens for f in every)
            life.cached_tokens = sum(f.cached_tokens for f in every if f.index == 0)
            life.finish_reason = ",".join(sorted({f.finish_reason.value for f in every}))
        self._metrics.tracing.record(life)

    def succeeded(self, finals: list[list[FinalEvent]]) -> None:
        """`finals`: the FinalEvents of each engine request this HTTP request made."""
        if not self._finish():
            return
        m, every = self._metrics, [f for group in finals for f in group]
        m.counts["tgi_request_success"] += 1
        m.duration.observe(time.monotonic() - self._arrival)
        self._trace("success", finals)
        if not every:
            return
        inference_s = max(f.inference_s for f in every)
        generated = sum(f.generated_tokens for f in every)
        m.queue_duration.observe(min(f.queue_s for f in every))
        m.inference_duration.observe(inference_s)
        m.input_length.observe(sum(group[0].prompt_tokens for group in finals if group))
        m.generated_tokens.observe(generated)
        if generated:
            m.time_per_token.observe(inference_s / generated)


class _EngineCollector:
    def __init__(self, read_engine: Callable[[], EngineGauges | None]):
        self.read_engine = read_engine

    def collect(self):
        stats = self.read_engine()
        if stats is None:
            return
        for name, doc, value in (
            ("tgi_queue_size", "Sequences waiting to be scheduled", stats.waiting),
            ("tgi_batch_current_size", "Sequences in the running batch", stats.running),
            ("parley_kv_blocks_used", "KV-cache blocks in use", stats.kv_blocks_used),
            ("parley_kv_blocks_total", "KV-cache blocks in the pool", stats.kv_blocks_total),
            ("parley_num_requests_waiting", "Requests waiting for their first step (vllm:num_requests_waiting)",
             stats.requests_waiting),
            ("parley_num_requests_running", "Requests in the running batch (vllm:num_requests_running)",
             stats.requests_running),
            ("parley_kv_cache_usage_perc", "Share of the KV-cache blocks in use, 0 to 1 (vllm:kv_cache_usage_perc)",
             stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0),
            ("parley_lora_adapters_loaded", "LoRA adapters served now", stats.adapters_loaded),
            ("parley_compute_threads", "Threads the engine's steps run on now: fewer than --num-threads while other "
             "processes hold cores (--adapt-threads)", stats.compute_threads),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        lora = GaugeMetricFamily("parley_lora_requests_info", "LoRA adapters of the running and waiting requests, and "
                                 "how many one batch can run; its value is when it was read (vllm:lora_requests_info)",
                                 labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        lora.add_metric([",".join(stats.running_adapters), ",".join(stats.waiting_adapters),
                         str(stats.max_adapters_per_batch)], time.time())
        yield lora
        for name, doc, value in (
            ("parley_generated_tokens", "Tokens generated, counted as each is sampled (tokens/s is its rate)",
             stats.generated_tokens),
            ("parley_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache (each sequence's, "
             "at its first admission)", stats.prefix_cache_queried_tokens),
            ("parley_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache (their K/V not computed again)",
             stats.prefix_cache_hit_tokens),
            ("parley_draft_tokens", "Draft tokens verified, a prediction's or --speculate's "
             "(vllm:spec_decode_num_draft_tokens)", stats.draft_tokens),
            ("parley_draft_accepted_tokens", "Draft tokens kept: the same as decoding would have chosen "
             "(vllm:spec_decode_num_accepted_tokens)", stats.draft_accepted_tokens),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        adapters = CounterMetricFamily("parley_adapter_requests", "Generation requests per LoRA adapter",
                                       labels=["adapter"])
        for name, count in sorted(stats.adapter_requests.items()):
            adapters.add_metric([name], count)
        yield adapters
