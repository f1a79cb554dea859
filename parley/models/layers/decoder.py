"""The decoder layer every family builds on, and the stack around it, over a flat batch and a paged
KV cache.

Written for small models on CPU, where per-op overhead matters as much as FLOPs: q/k/v are one
fused matmul, gate/up another, and RoPE's cos/sin come from a table built once. Parameters are
plain tensors (no nn.Linear) that never require grad; `load_weights` fills them from HF names.
LoRA adapters ride along as an optional per-step `LoRABatch` (parley/adapters/ops.py): each
projection adds its tokens' own adapter deltas, so one batch mixes the base model and adapters.
Where every layer is Llama's with 4- or 8-bit projections and the attention kernel serves the model
(the default model's case), a step without adapters runs the layers in one kernel call instead
(`_layer_stack`, parley/kernels/stack.py): the same kernels in the same order, the same bits, a
one-row decode step in half the time.

A family is a subclass of `DecoderModel` that reads its config.json (`config_from_hf`), names its
tensors (`_projection_parts`, `_layer_tensors`) and, where it places its norms otherwise than
Llama, brings its own `DecoderLayer.forward`. What the families tune (q/k norms, soft-capping,
sliding windows, scales, activations) is in ModelConfig and taken here once.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from parley.adapters.ops import NO_LORA, LayerLoRA, LoRABatch, lora_linear
from parley.config import ModelConfig
from parley.kernels import stack as stack_kernel
from parley.kernels.activation import silu_mul
from parley.kernels.linear import (GROUP, QuantRows, QuantWeight, can_pack, check_rows_per_call, linear, pack, prepack,
                                   quantize_q4)
from parley.kernels.norm import rms_norm
from parley.models.attention import AttentionMetadata, kernel_rows, kernel_serves, paged_attention
from parley.models.layers.rotary import Rope, RotaryTable

ACTIVATIONS = {"silu": F.silu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh"), "gelu": F.gelu}
STACK_CALL = True  # whether _layer_stack may serve a step; bench/profile_step.py times the parts without it
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def glu(act: str, gate_up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up [N, I] of a fused gate_up [N, 2I] (gate, then up); silu's in one kernel call."""
    if act == "silu":
        return silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return ACTIVATIONS[act](gate) * up


def param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def refuse(cfg: dict, arch: str, served: dict[str, tuple]) -> None:
    """ValueError naming the first config field whose value Parley does not serve for `arch`;
    `served` maps each such field to the values it serves (an absent field is served)."""
    for key, values in served.items():
        if key in cfg and cfg[key] not in values:
            shown = " or ".join(repr(v) for v in values)
            raise ValueError(f"{arch}: config field {key}={cfg[key]!r} is not supported (Parley serves {shown})")


def hf_activation(cfg: dict, arch: str, key: str = "hidden_act") -> str:
    name = cfg.get(key, "silu")
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"{arch}: config field {key}={name!r} is not supported "
                         f"(Parley serves {', '.join(HF_ACTIVATIONS)})")
    return HF_ACTIVATIONS[name]


def pack_projection(weight: torch.Tensor, rows: QuantRows | None, quantize: str | None):
    """`weight` in the form `linear` runs fastest: 4- or 8-bit where it has such rows (`rows`, from
    a GGUF file, or 4-bit made here with quantize="int4") and the kernel runs, else `prepack`ed (the
    caller drops the plain copy: loading weights is over by then). Where the kernel does not run,
    int4 weights are kept in the model's dtype, with their 4-bit values."""
    if rows is None and quantize == "int4" and weight.shape[1] % GROUP == 0:
        rows = quantize_q4(weight)
        if not can_pack(weight):
            weight.copy_(rows.dequantize())
    return pack(rows) if rows is not None and can_pack(weight) else prepack(weight)


class DecoderLayer(nn.Module):
    """Pre-norm (Llama's): h + attention(norm(h)), then + mlp(norm(.))."""

    PROJECTIONS = ("qkv_weight", "o_weight", "gate_up_weight", "down_weight")

    def __init__(self, config: ModelConfig, index: int, *, o_bias: bool, intermediate_size: int | None = None):
        super().__init__()
        hidden, head_dim = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, head_dim
        self.eps = config.rms_norm_eps
        self.scale = config.attention_scale if config.attention_scale is not None else head_dim**-0.5
        self.window = config.window(index)
        self.softcap = config.attn_logit_softcap
        self.clip = config.clip_qkv
        self.qk_norm = config.qk_norm
        self.rope = 1 if config.rope_local_theta is not None and self.window is not None else 0  # model.rotary[i]
        self.act = config.hidden_act
        qkv_rows = (config.num_heads + 2 * config.num_kv_heads) * head_dim
        self.input_norm = param(hidden)
        self.qkv_weight = param(qkv_rows, hidden)  # rows: q, then k, then v
        self.qkv_bias = param(qkv_rows) if config.attention_bias else None
        if self.qk_norm == "head":
            self.q_norm, self.k_norm = param(head_dim), param(head_dim)
        elif self.qk_norm == "whole":
            self.q_norm, self.k_norm = param(config.num_heads * head_dim), param(config.num_kv_heads * head_dim)
        self.o_weight = param(hidden, config.num_heads * head_dim)
        self.o_bias = param(hidden) if o_bias else None
        self.post_attention_norm = param(hidden)
        inter = config.intermediate_size if intermediate_size is None else intermediate_size
        if inter:  # 0: the layer brings its own MLP
            self.gate_up_weight = param(2 * inter, hidden)  # rows: gate, then up
            self.down_weight = param(hidden, inter)

    def prepack(self, quantize: str | None, quantized: dict[str, QuantRows]) -> None:
        """Swap each projection weight for the form `linear` runs fastest (see `pack_projection`),
        with its 4- or 8-bit rows from a GGUF file where `quantized` has them."""
        for name in self.PROJECTIONS:
            weight = getattr(self, name)
            packed = pack_projection(weight, quantized.get(name), quantize)
            if packed is not weight:
                delattr(self, name)  # unregister the parameter; a plain attribute takes its place
                setattr(self, name, packed)

    def projection_weights(self) -> list:
        """The weights `linear` runs, once prepacked."""
        return [getattr(self, name) for name in self.PROJECTIONS]

    def forward(self, delta, hidden, rope, k_cache, v_cache, meta: AttentionMetadata,
                lora: LayerLoRA = NO_LORA) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is hidden + delta (None: delta alone), added where it is normed
        (one call with the norm, parley/kernels/norm.py); returns the next (delta, hidden)."""
        x, hidden = rms_norm(delta, hidden, self.input_norm, self.eps)
        delta = self._attention(x, rope, k_cache, v_cache, meta, lora)
        x, hidden = rms_norm(delta, hidden, self.post_attention_norm, self.eps)
        return self._mlp(x, lora), hidden

    def _attention(self, x, rope, k_cache, v_cache, meta, lora: LayerLoRA) -> torch.Tensor:
        n, heads, kv_heads, head_dim = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = lora_linear(x, self.qkv_weight, self.qkv_bias, lora.qkv)  # [N, (H + 2*KVH) * D]
        if self.qk_norm == "whole":  # over each whole projection (OLMo 2, OLMoE)
            q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
            q = F.rms_norm(q, q.shape[-1:], self.q_norm, self.eps)  # [N, H*D]
            k = F.rms_norm(k, k.shape[-1:], self.k_norm, self.eps)  # [N, KVH*D]
            qk = torch.cat((q, k), dim=-1).view(n, heads + kv_heads, head_dim)  # [N, H + KVH, D]
            v = v.view(n, kv_heads, head_dim)
        else:
            qkv = qkv.view(n, heads + 2 * kv_heads, head_dim)  # [N, H + 2*KVH, D]
            qk, v = qkv[:, : heads + kv_heads], qkv[:, heads + kv_heads :]  # [N, H + KVH, D], [N, KVH, D]
            if self.qk_norm == "head":  # over each head (Qwen3, Gemma 3)
                q, k = qk.split([heads, kv_heads], dim=1)
                qk = torch.cat((F.rms_norm(q, (head_dim,), self.q_norm, self.eps),
                                F.rms_norm(k, (head_dim,), self.k_norm, self.eps)), dim=1)
        if self.clip is not None:  # after the norms, as OLMoE clamps
            qk, v = qk.clamp(-self.clip, self.clip), v.clamp(-self.clip, self.clip)
        q, k = qk.split([heads, kv_heads], dim=1)  # [N, H, D], [N, KVH, D], rotated by the attention
        out = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale, window=self.window, softcap=self.softcap,
                              rope=rope)
        out = out.reshape(n, heads * head_dim)  # [N, H*D]
        return lora_linear(out, self.o_weight, self.o_bias, lora.o)  # [N, hidden]

    def _mlp(self, x, lora: LayerLoRA) -> torch.Tensor:
        gate_up = lora_linear(x, self.gate_up_weight, None, lora.gate_up)  # [N, 2I]
        return lora_linear(glu(self.act, gate_up), self.down_weight, None, lora.down)


class DecoderModel(nn.Module):
    """Embedding, decoder layers, final norm and lm_head; subclasses are the families."""

    HF_DEFAULTS: dict = {}  # the HF config class's defaults of the fields read here: a config.json may omit them
    NORM_SHIFT = 0.0  # added to every norm weight at load (Gemma's norms multiply by 1 + w)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = param(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self._make_layer(config, i) for i in range(config.num_layers))
        self.norm = param(config.hidden_size)
        tied = config.tie_word_embeddings
        self.lm_head = self.embed_tokens if tied else param(config.vocab_size, config.hidden_size)
        self.lm_head_packed: torch.Tensor | None = None  # set by prepack()
        self.quant_rows: dict[str, QuantRows] = {}  # HF name -> 4- or 8-bit rows, from load_weights until prepack
        self._stack: tuple[list, stack_kernel.LayerStack | None] | None = None  # the caches it was built for, and it (_layer_stack)
        c = config
        tables = [RotaryTable(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings, c.partial_rotary_factor)]
        if c.rope_local_theta is not None:  # the sliding layers' own (Gemma 3)
            tables.append(RotaryTable(c.head_dim, c.rope_local_theta, None, c.max_position_embeddings,
                                      c.partial_rotary_factor))
        self.rotary = nn.ModuleList(tables)

    @classmethod
    def config_from_hf(cls, cfg: dict) -> ModelConfig:
        """This family's ModelConfig from its config.json; ValueError names a field it does not serve."""
        cfg = {**cls.HF_DEFAULTS, **cfg}
        arch = (cfg.get("architectures") or [cls.__name__])[0]
        if cfg.get("quantization_config"):
            method = cfg["quantization_config"].get("quant_method", "?")
            raise ValueError(f"{arch}: config field quantization_config ({method}) is not supported; "
                             "Parley loads unquantized safetensors, or GGUF files")
        return ModelConfig.from_hf(cfg, **cls._family_config(cfg, arch))

    @classmethod
    def _family_config(cls, cfg: dict, arch: str) -> dict:
        """The ModelConfig fields the family sets beyond the shared ones, refusing what it does not serve."""
        raise NotImplementedError

    def _make_layer(self, config: ModelConfig, index: int) -> DecoderLayer:
        return DecoderLayer(config, index, o_bias=config.attention_bias)

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
        if self.config.embedding_scale != 1.0:  # rounded to the model's dtype first, as HF does
            delta = delta * torch.tensor(self.config.embedding_scale, dtype=delta.dtype)
        ropes = [Rope(table, positions) for table in self.rotary]
        stack = self._layer_stack(kv_caches) if lora is None and meta.window_meta is None else None
        if stack is not None:
            return stack(delta.contiguous(), meta.slot_mapping, *kernel_rows(meta), ropes[0])
        layer_loras = lora.layers if lora is not None else [NO_LORA] * len(self.layers)
        for layer, (k_cache, v_cache), layer_lora in zip(self.layers, kv_caches, layer_loras, strict=True):
            delta, hidden = layer(delta, hidden, ropes[layer.rope], k_cache, v_cache, meta, layer_lora)
        return rms_norm(delta, hidden, self.norm, self.config.rms_norm_eps)[0]

    def _layer_stack(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> stack_kernel.LayerStack | None:
        """The layers in one kernel call a step (parley/kernels/stack.py), where it serves them all:
        Llama's layers, every projection on the 4/8-bit kernel, attention on its kernel; built at the
        first step with these caches. The step's adapters or a sliding layers' own pool keep the
        Python path (callers check)."""
        if not STACK_CALL:
            return None
        if self._stack is not None and self._stack[0] is kv_caches:
            return self._stack[1]
        c, layers = self.config, list(self.layers)
        k_cache = kv_caches[0][0]
        if not (layers and len(self.rotary) == 1 and stack_kernel.available()
                and all(type(x) is DecoderLayer and x.qk_norm is None and x.clip is None and x.act == "silu"
                        and x.scale == layers[0].scale and x.softcap == layers[0].softcap
                        and all(isinstance(w, QuantWeight) for w in x.projection_weights()) for x in layers)
                and kernel_serves(k_cache.device, k_cache.dtype, c.num_heads, c.num_kv_heads, c.head_dim, k_cache.shape[2])):
            self._stack = (kv_caches, None)
            return None
        stack = stack_kernel.LayerStack(
            [stack_kernel.StackLayer(x.input_norm, x.post_attention_norm, x.qkv_weight, x.qkv_bias, x.o_weight, x.o_bias,
                        x.gate_up_weight, x.down_weight, k, v, x.window) for x, (k, v) in zip(layers, kv_caches, strict=True)],
            self.norm, heads=c.num_heads, kv_heads=c.num_kv_heads, head_dim=c.head_dim, eps=c.rms_norm_eps,
            scale=layers[0].scale, softcap=layers[0].softcap)
        self._stack = (kv_caches, stack)
        return stack

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[M, hidden] normed hidden states -> [M, vocab] float32 logits."""
        logits = linear(hidden, self.lm_head_packed if self.lm_head_packed is not None else self.lm_head).float()
        if self.config.logits_divisor != 1.0:
            logits = logits / self.config.logits_divisor
        if self.config.final_logit_softcap is not None:
            cap = self.config.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits

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
        weights = [w for layer in self.layers for w in layer.projection_weights()] + [packed]
        check_rows_per_call([w for w in weights if isinstance(w, torch.Tensor) and w.is_mkldnn])

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantRows]], *,
                     norms_shifted: bool = False) -> None:
        """Fill the (fused) parameters from HF-named tensors; ValueError on unknown/missing/misshapen.
        4- and 8-bit rows fill them dequantized, and are kept for `prepack`. `norms_shifted`: the
        norm weights already hold NORM_SHIFT (llama.cpp adds Gemma's 1 when it converts)."""
        targets = self._weight_targets()
        loaded = set()
        shift = 0.0 if norms_shifted else self.NORM_SHIFT
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
            if shift and name.endswith("norm.weight"):
                tensor = tensor.float() + shift  # in float32, as HF adds it
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
            targets.update(self._layer_tensors(i, layer))
        return targets

    def _layer_tensors(self, i: int, layer: DecoderLayer) -> dict[str, torch.Tensor]:
        """Layer i's tensors other than the projections' weights (and q/k/v biases), by HF name."""
        p = f"model.layers.{i}."
        targets = {f"{p}input_layernorm.weight": layer.input_norm,
                   f"{p}post_attention_layernorm.weight": layer.post_attention_norm}
        if layer.o_bias is not None:
            targets[f"{p}self_attn.o_proj.bias"] = layer.o_bias
        if layer.qk_norm is not None:
            targets[f"{p}self_attn.q_norm.weight"] = layer.q_norm
            targets[f"{p}self_attn.k_norm.weight"] = layer.k_norm
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
