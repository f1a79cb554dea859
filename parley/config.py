"""Frozen configuration values. Stdlib only."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only model and the settings of its family that change the math. The
    defaults are Llama's; each family's class in parley/models/ reads its HF config.json into this
    (see `from_hf` for the fields every family shares) and refuses the fields it does not honour."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    hidden_act: str = "silu"  # the gated MLP's activation: silu, gelu_tanh or gelu
    partial_rotary_factor: float = 1.0  # the share of each head's dims RoPE rotates (Phi-4-mini: 0.75)
    qk_norm: str | None = None  # RMSNorm of q and k before RoPE: "head" (each head) or "whole" (each projection)
    clip_qkv: float | None = None  # q, k and v clamped to [-clip_qkv, clip_qkv] (OLMoE)
    attention_scale: float | None = None  # the scores' scale; None: head_dim ** -0.5
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcap: float | None = None  # the same on the logits
    embedding_scale: float = 1.0  # the embeddings times this (Gemma: sqrt(hidden); Granite)
    residual_scale: float = 1.0  # each attention and MLP output times this before it joins the residual (Granite)
    logits_divisor: float = 1.0  # the logits divided by this (Granite's logits_scaling)
    sliding_window: int | None = None  # keys a sliding layer's token sees, itself included
    layer_types: tuple[str, ...] = ()  # "sliding_attention" or "full_attention" per layer; (): all full
    rope_local_theta: float | None = None  # the sliding layers' own RoPE base, unscaled (Gemma 3)
    num_experts: int = 0  # a sparse MoE MLP in the layers not in `dense_layers`; 0: dense
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # the chosen experts' weights renormalized to sum to 1
    dense_layers: tuple[int, ...] = ()  # an MoE model's layers with a dense MLP instead

    def window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`; None: it attends to the whole context."""
        if self.sliding_window is None or (self.layer_types and self.layer_types[layer] != "sliding_attention"):
            return None
        return self.sliding_window

    @classmethod
    def from_hf(cls, cfg: dict, **family) -> "ModelConfig":
        """The fields every family shares, from an HF config.json; `family` sets the others."""
        archs = cfg.get("architectures") or [cfg.get("model_type", "unknown")]
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        values = dict(
            architecture=archs[0],
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=cfg.get("rope_theta", 10000.0),
            rope_scaling=cfg.get("rope_scaling"),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", False),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
        values.update(family)
        return cls(**values)


def _env(name: str, default, cast=str):
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return cast(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={value!r}: {exc}") from exc


def parse_bool(text: str) -> bool:
    """A yes/no environment variable (NO_PLAYGROUND=1)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false (1/0, yes/no, on/off), not {text!r}")


def parse_lora_adapters(text: str) -> tuple[tuple[str, str], ...]:
    """TGI's LORA_ADAPTERS: comma-separated `name=path`, or a bare path that is also the name."""
    pairs = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        name, sep, path = entry.partition("=")
        pairs.append((name.strip(), path.strip()) if sep else (entry, entry))
    return tuple(pairs)


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings; limit names follow TGI's launcher."""

    model_id: str | None = None  # local HF folder or GGUF file; None: the default SmolLM2 wheel
    dtype: str = "bfloat16"
    device: str = "cpu"
    num_threads: int | None = None  # torch intra-op threads; None: all cores
    adapt_threads: bool = True  # fewer of them while other processes hold cores (engine/threads.py)
    block_size: int = 16
    max_concurrent_requests: int = 128
    # prompt tokens accepted and not yet prefilled before answering 429: ~16 s of prefill at the
    # ~2,000 tok/s of a 2-core machine (SmolLM2-135M), so no one waits minutes for a first token
    max_queued_tokens: int = 32768
    max_input_tokens: int | None = None  # None: derived from the model's context
    max_total_tokens: int | None = None
    max_batch_prefill_tokens: int = 512
    max_batch_total_tokens: int | None = None  # KV cache size in tokens; None: from max_batch_size
    max_batch_size: int = 64  # sequences running at once
    max_best_of: int = 4
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_n: int = 16  # sequences per request (OpenAI n)
    waiting_served_ratio: float = 1.2
    max_waiting_tokens: int = 20
    watermark_gamma: float = 0.5
    watermark_delta: float = 2.0
    lora_adapters: tuple[tuple[str, str], ...] = ()  # (name, path) of the PEFT folders loaded at start
    max_lora_rank: int = 64
    quantize: str | None = None  # "int4": 4-bit decoder projections, as a Q4 GGUF's run anyway
    speculate: int = 0  # TGI's: draft tokens a step from each sequence's own prompt and output (0: none)

    @classmethod
    def from_env(cls, **overrides) -> "EngineConfig":
        """Defaults, then PARLEY_*/TGI-style environment variables, then explicit overrides."""
        values = dict(
            model_id=_env("MODEL_ID", None),
            dtype=_env("DTYPE", cls.dtype),
            device=_env("DEVICE", cls.device),
            num_threads=_env("NUM_THREADS", None, int),
            adapt_threads=_env("ADAPT_THREADS", cls.adapt_threads, parse_bool),
            max_concurrent_requests=_env("MAX_CONCURRENT_REQUESTS", cls.max_concurrent_requests, int),
            max_queued_tokens=_env("MAX_QUEUED_TOKENS", cls.max_queued_tokens, int),
            max_input_tokens=_env("MAX_INPUT_TOKENS", None, int),
            max_total_tokens=_env("MAX_TOTAL_TOKENS", None, int),
            max_batch_prefill_tokens=_env("MAX_BATCH_PREFILL_TOKENS", cls.max_batch_prefill_tokens, int),
            max_batch_total_tokens=_env("MAX_BATCH_TOTAL_TOKENS", None, int),
            max_batch_size=_env("MAX_BATCH_SIZE", cls.max_batch_size, int),
            max_best_of=_env("MAX_BEST_OF", cls.max_best_of, int),
            max_stop_sequences=_env("MAX_STOP_SEQUENCES", cls.max_stop_sequences, int),
            max_top_n_tokens=_env("MAX_TOP_N_TOKENS", cls.max_top_n_tokens, int),
            waiting_served_ratio=_env("WAITING_SERVED_RATIO", cls.waiting_served_ratio, float),
            max_waiting_tokens=_env("MAX_WAITING_TOKENS", cls.max_waiting_tokens, int),
            watermark_gamma=_env("WATERMARK_GAMMA", cls.watermark_gamma, float),
            watermark_delta=_env("WATERMARK_DELTA", cls.watermark_delta, float),
            lora_adapters=_env("LORA_ADAPTERS", (), parse_lora_adapters),
            max_lora_rank=_env("MAX_LORA_RANK", cls.max_lora_rank, int),
            quantize=_env("QUANTIZE", None),
            speculate=_env("SPECULATE", cls.speculate, int),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    cors_allow_origin: tuple[str, ...] = ()
    max_client_batch_size: int = 4
    payload_limit: int = 2_000_000  # bytes of a request body, as TGI's --payload-limit
    drain_timeout: float = 30.0  # seconds requests in flight get to finish after SIGTERM
    lora_root: str | None = None  # the folder /v1/load_lora_adapter may read adapters from; None: none
    served_model_names: tuple[str, ...] = ()  # names `model` may give (the first is reported); (): the model id
    unknown_fields: str = "refuse"  # a body field Parley does not know: "refuse" (400/422 naming it) or "ignore"
    reasoning_format: str = "auto"  # a thinking model's reasoning: "auto" (apart, reasoning_content) or "none" (in content)
    playground: bool = True  # GET / serves the browser playground (--no-playground: off)
    status_interval: float = 10.0  # seconds between console status lines while busy; 0: none
    otlp_endpoint: str | None = None  # an OTLP/HTTP collector for request traces (the otel extra); None: no tracing
    otlp_service_name: str = "parley"

    @classmethod
    def from_env(cls, **overrides) -> "ServerConfig":
        origins = _env("CORS_ALLOW_ORIGIN", "")
        names = _env("SERVED_MODEL_NAME", "")
        values = dict(
            hostname=_env("HOSTNAME_BIND", cls.hostname),
            port=_env("PORT", cls.port, int),
            api_key=_env("API_KEY", None),
            cors_allow_origin=tuple(o for o in origins.split(",") if o),
            served_model_names=tuple(n for n in names.split(",") if n),
            max_client_batch_size=_env("MAX_CLIENT_BATCH_SIZE", cls.max_client_batch_size, int),
            payload_limit=_env("PAYLOAD_LIMIT", cls.payload_limit, int),
            drain_timeout=_env("DRAIN_TIMEOUT", cls.drain_timeout, float),
            lora_root=_env("LORA_ROOT", None),
            unknown_fields=_env("UNKNOWN_FIELDS", cls.unknown_fields),
            reasoning_format=_env("REASONING_FORMAT", cls.reasoning_format),
            playground=not _env("NO_PLAYGROUND", False, parse_bool),
            status_interval=_env("STATUS_INTERVAL", cls.status_interval, float),
            otlp_endpoint=_env("OTLP_ENDPOINT", None),
            otlp_service_name=_env("OTLP_SERVICE_NAME", cls.otlp_service_name),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values["status_interval"] < 0:
            raise ValueError(f"--status-interval must be 0 (no status lines) or more seconds, not {values['status_interval']}")
        if values["unknown_fields"] not in ("refuse", "ignore"):
            raise ValueError(f"--unknown-fields must be refuse or ignore, not {values['unknown_fields']!r}")
        if values["reasoning_format"] not in ("auto", "none"):
            raise ValueError(f"--reasoning-format must be auto or none, not {values['reasoning_format']!r}")
        return cls(**values)
