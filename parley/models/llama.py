"""Llama-family decoder (Llama 2/3, SmolLM, Mistral, Qwen2) over a flat batch and a paged KV cache.

Written for small models on CPU, where per-op overhead matters as much as FLOPs: q/k/v are one
fused matmul, gate/up another, and RoPE's cos/sin come from a table built once. Parameters are
plain tensors (no nn.Linear) that never require grad; `load_weights` fills them from HF names.
LoRA adapters ride along as an optional per-step `LoRABatch` (parley/adapters/ops.py): each
projection adds its tokens' own adapter deltas, so one batch mixes the base model and adapters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from parley.adapters.ops import NO_LORA, LayerLoRA, LoRABatch, lora_linear
from parley.config import ModelConfig
from parley.kernels.linear import GROUP, QuantRows, can_pack, check_rows_per_call, linear, pack, prepack, quantize_q4
from parley.kernels.norm import rms_norm
from parley.models.attention import AttentionMetadata, paged_attention


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """[head_dim / 2] float32 inverse frequencies, computed exactly as transformers does."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"unsupported rope_scaling type {kind!r}; Parley supports default, linear and llama3")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Low frequencies are divided by `factor`, high ones kept, the band between interpolated.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF layout). x [N, heads, D]; cos, sin [N, 1, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)  # [N, heads, D/2] each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class DecoderLayer(nn.Module):
    PROJECTIONS = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden, head_dim = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, head_dim
        self.eps = config.rms_norm_eps
        self.scale = head_dim**-0.5
        qkv_rows = (config.num_heads + 2 * config.num_kv_heads) * head_dim
        self.input_norm = _param(hidden)
        self.qkv_weight = _param(qkv_rows, hidden)  # rows: q, then k, then v
        self.qkv_bias = _param(qkv_rows) if config.attention_bias else None
        self.o_weight = _param(hidden, config.num_heads * head_dim)
        # Llama puts a bias on o_proj too when attention_bias is set; Qwen2 only on q/k/v.
        has_o_bias = config.attention_bias and config.architecture != "Qwen2ForCausalLM"
        self.o_bias = _param(hidden) if has_o_bias else None
        self.post_attention_norm = _param(hidden)
        self.gate_up_weight = _param(2 * config.intermediate_size, hidden)  # rows: gate, then up
        self.down_weight = _param(hidden, config.intermediate_size)

    def prepack(self, quantize: str | None, quantized: dict[str, QuantRows]) -> None:
        """Swap each projection weight for the form `linear` runs fastest: 4- or 8-bit where it has
        such rows (`quantized`, from a GGUF file, or 4-bit made here with quantize="int4") and the
        kernel runs, else `prepack`ed (the plain copy is dropped: loading weights is over by then).
        Where the kernel does not run, int4 weights are kept in the model's dtype, with their 4-bit
        values."""
        for name in self.PROJECTIONS:
            weight = getattr(self, name)
            rows = quantized.get(name)
            if rows is None and quantize == "int4" and weight.shape[1] % GROUP == 0:
                rows = quantize_q4(weight)
                if not can_pack(weight):
                    weight.copy_(rows.dequantize())
            packed = pack(rows) if rows is not None and can_pack(weight) else prepack(weight)
            if packed is not weight:
                delattr(self, name)  # unregister the parameter; a plain attribute takes its place
                setattr(self, name, packed)

    def forward(self, delta, hidden, cos, sin, k_cache, v_cache, meta: AttentionMetadata,
                lora: LayerLoRA = NO_LORA) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is hidden + delta (None: delta alone), added where it is normed
        (one call with the norm, parley/kernels/norm.py); returns the next (delta, hidden)."""
        x, hidden = rms_norm(delta, hidden, self.input_norm, self.eps)
        delta = self._attention(x, cos, sin, k_cache, v_cache, meta, lora)
        x, hidden = rms_norm(delta, hidden, self.post_attention_norm, self.eps)
        return self._mlp(x, lora), hidden

    def _attention(self, x, cos, sin, k_cache, v_cache, meta, lora: LayerLoRA) -> torch.Tensor:
        n, heads, kv_heads = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = lora_linear(x, self.qkv_weight, self.qkv_bias, lora.qkv)  # [N, (H + 2*KVH) * D]
        qkv = qkv.view(n, heads + 2 * kv_heads, self.head_dim)  # [N, H + 2*KVH, D]
        qk = apply_rope(qkv[:, : heads + kv_heads], cos, sin)  # [N, H + KVH, D]
        q, k = qk.split([heads, kv_heads], dim=1)  # [N, H, D], [N, KVH, D]
        v = qkv[:, heads + kv_heads :]  # [N, KVH, D]
        out = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)  # [N, H, D]
        out = out.reshape(n, heads * self.head_dim)  # [N, H*D]
        return lora_linear(out, self.o_weight, self.o_bias, lora.o)  # [N, hidden]

    def _mlp(self, x, lora: LayerLoRA) -> torch.Tensor:
        gate, up = lora_linear(x, self.gate_up_weight, None, lora.gate_up).chunk(2, dim=-1)  # [N, I] each
        return lora_linear(F.silu(gate) * up, self.down_weight, None, lora.down)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = _param(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = _param(config.hidden_size)
        tied = config.tie_word_embeddings
        self.lm_head = self.embed_tokens if tied else _param(config.vocab_size, config.hidden_size)
        self.lm_head_packed: torch.Tensor | None = None  # set by prepack()
        self.quant_rows: dict[str, QuantRows] = {}  # HF name -> 4- or 8-bit rows, from load_weights until prepack
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, rope_inv_freq(config))  # [max_positions, D/2]
        # Cast with the model's dtype by .to(), like HF's cos.to(x.dtype).
        self.register_buffer("rope_cos", freqs.cos(), persistent=False)
        self.register_buffer("rope_sin", freqs.sin(), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,  # [N]
        positions: torch.Tensor,  # [N]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        lora: LoRABatch | None = None,  # the step's adapters; None: base model only
    ) -> torch.Tensor:
        """Hidden states [N, hidden] after the final norm (compute_logits applies only lm_head)."""
        delta, hidden = F.embedding(input_ids, self.embed_tokens), None  # [N, hidden]
        cos = self.rope_cos[positions].unsqueeze(1)  # [N, 1, D/2]
        sin = self.rope_sin[positions].unsqueeze(1)
        layer_loras = lora.layers if lora is not None else [NO_LORA] * len(self.layers)
        for layer, (k_cache, v_cache), layer_lora in zip(self.layers, kv_caches, layer_loras, strict=True):
            delta, hidden = layer(delta, hidden, cos, sin, k_cache, v_cache, meta, layer_lora)
        return rms_norm(delta, hidden, self.norm, self.config.rms_norm_eps)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[M, hidden] normed hidden states -> [M, vocab] float32 logits."""
        return linear(hidden, self.lm_head_packed if self.lm_head_packed is not None else self.lm_head).float()

    def prepack(self, quantize: str | None = None) -> None:
        """Lay the projection weights out for the fastest `linear` on this device and dtype, once
        the weights are loaded (see parley/kernels/linear.py); quantize="int4" makes the decoder
        layers' projections 4-bit. Where the kernel runs, weights loaded in 4 or 8 bits run from
        those bits, the lm_head too (a tied one from the embedding's, whose plain matrix stays for
        the lookup); else the lm_head is packed in the model's dtype."""
        for i, layer in enumerate(self.layers):
            quantized = {}
            for projection, parts in self._projection_parts(i).items():
                rows = [self.quant_rows.get(f"{module}.weight") for module, _ in parts]
                if rows[0] is not None and all(type(r) is type(rows[0]) for r in rows):
                    quantized[projection] = type(rows[0]).cat(rows)
            layer.prepack(quantize, quantized)
        rows = self.quant_rows.get("model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight")
        self.quant_rows.clear()
        packed = pack(rows) if rows is not None and can_pack(self.lm_head) else prepack(self.lm_head)
        self.lm_head_packed = packed if packed is not self.lm_head else None
        weights = [getattr(layer, name) for layer in self.layers for name in layer.PROJECTIONS] + [packed]
        check_rows_per_call([w for w in weights if isinstance(w, torch.Tensor) and w.is_mkldnn])

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantRows]]) -> None:
        """Fill the (fused) parameters from HF-named tensors; ValueError on unknown/missing/misshapen.
        4- and 8-bit rows fill them dequantized, and are kept for `prepack`."""
        targets = self._weight_targets()
        loaded = set()
        for name, tensor in weights:
            if isinstance(tensor, QuantRows):
                self.quant_rows[name] = tensor
                tensor = tensor.dequantize()
            target = targets.get(name)
            if target is None:
                if name.endswith("rotary_emb.inv_freq") or (
                    name == "lm_head.weight" and self.config.tie_word_embeddings
                ):
                    continue  # derived from the config / tied to the embeddings
                raise ValueError(f"unknown tensor {name!r} for {self.config.architecture}")
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
                )
            target.copy_(tensor)
            loaded.add(name)
        missing = sorted(targets.keys() - loaded)
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise ValueError(f"missing tensor(s) {', '.join(missing[:3])}{more}")

    def _weight_targets(self) -> dict[str, torch.Tensor]:
        """HF tensor name -> the view of our parameter it fills."""
        c = self.config
        targets = {"model.embed_tokens.weight": self.embed_tokens, "model.norm.weight": self.norm}
        if not c.tie_word_embeddings:
            targets["lm_head.weight"] = self.lm_head
        for i, layer in enumerate(self.layers):
            for projection, parts in self._projection_parts(i).items():
                start = 0
                for module, rows in parts:
                    targets[f"{module}.weight"] = getattr(layer, projection).narrow(0, start, rows)
                    if projection == "qkv_weight" and layer.qkv_bias is not None:
                        targets[f"{module}.bias"] = layer.qkv_bias.narrow(0, start, rows)
                    start += rows
            p = f"model.layers.{i}."
            if layer.o_bias is not None:
                targets[f"{p}self_attn.o_proj.bias"] = layer.o_bias
            targets[f"{p}input_layernorm.weight"] = layer.input_norm
            targets[f"{p}post_attention_layernorm.weight"] = layer.post_attention_norm
        return targets

    def _projection_parts(self, i: int) -> dict[str, list[tuple[str, int]]]:
        """Layer i's fused projections: the HF modules whose rows each holds, in order, and how many."""
        c, p = self.config, f"model.layers.{i}."
        q_rows, kv_rows, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
        return {
            "qkv_weight": [(f"{p}self_attn.q_proj", q_rows), (f"{p}self_attn.k_proj", kv_rows),
                           (f"{p}self_attn.v_proj", kv_rows)],
            "o_weight": [(f"{p}self_attn.o_proj", c.hidden_size)],
            "gate_up_weight": [(f"{p}mlp.gate_proj", inter), (f"{p}mlp.up_proj", inter)],
            "down_weight": [(f"{p}mlp.down_proj", c.hidden_size)],
        }
