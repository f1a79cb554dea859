"""Gemma 2: norms before and after both the attention and the MLP, each RMSNorm multiplying by
1 + w (folded into the weights at load), embeddings times sqrt(hidden), GELU (tanh), the scores
scaled by query_pre_attn_scalar and soft-capped, the logits soft-capped, and sliding-window layers
alternating with global ones."""

from __future__ import annotations

import torch

from parley.adapters.ops import NO_LORA, LayerLoRA
from parley.config import ModelConfig
from parley.kernels.norm import rms_norm
from parley.models.attention import AttentionMetadata
from parley.models.layers.decoder import DecoderLayer, DecoderModel, hf_activation, param


class GemmaDecoderLayer(DecoderLayer):
    """h + norm(attention(norm(h))), then h + norm(mlp(norm(h))); post_attention_norm is the
    attention's second norm, pre_feedforward_norm the MLP's first."""

    def __init__(self, config: ModelConfig, index: int):
        super().__init__(config, index, o_bias=config.attention_bias)
        self.pre_feedforward_norm = param(config.hidden_size)
        self.post_feedforward_norm = param(config.hidden_size)

    def forward(self, delta, hidden, rope, k_cache, v_cache, meta: AttentionMetadata,
                lora: LayerLoRA = NO_LORA) -> tuple[torch.Tensor, torch.Tensor]:
        x, hidden = rms_norm(delta, hidden, self.input_norm, self.eps)
        attention = self._attention(x, rope, k_cache, v_cache, meta, lora)
        delta = rms_norm(attention, None, self.post_attention_norm, self.eps)[0]
        x, hidden = rms_norm(delta, hidden, self.pre_feedforward_norm, self.eps)
        return rms_norm(self._mlp(x, lora), None, self.post_feedforward_norm, self.eps)[0], hidden


class Gemma2ForCausalLM(DecoderModel):
    HF_DEFAULTS = {"tie_word_embeddings": True, "rms_norm_eps": 1e-6, "attention_bias": False, "head_dim": 256,
                   "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 4096, "query_pre_attn_scalar": 256,
                   "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "max_position_embeddings": 8192}
    NORM_SHIFT = 1.0

    @classmethod
    def _family_config(cls, cfg: dict, arch: str) -> dict:
        return {"hidden_act": hf_activation(cfg, arch, "hidden_activation"),
                "attention_scale": cfg["query_pre_attn_scalar"] ** -0.5,
                "attn_logit_softcap": cfg["attn_logit_softcapping"],
                "final_logit_softcap": cfg["final_logit_softcapping"],
                "embedding_scale": cfg["hidden_size"] ** 0.5,
                "sliding_window": cfg["sliding_window"], "layer_types": cls._layer_types(cfg)}

    @classmethod
    def _layer_types(cls, cfg: dict) -> tuple[str, ...]:
        """Even layers slide, odd ones are global, unless layer_types says otherwise."""
        n = cfg["num_hidden_layers"]
        return tuple(cfg.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)])

    def _make_layer(self, config: ModelConfig, index: int) -> DecoderLayer:
        return GemmaDecoderLayer(config, index)

    def _layer_tensors(self, i: int, layer: DecoderLayer) -> dict[str, torch.Tensor]:
        p = f"model.layers.{i}."
        return {**super()._layer_tensors(i, layer),
                f"{p}pre_feedforward_layernorm.weight": layer.pre_feedforward_norm,
                f"{p}post_feedforward_layernorm.weight": layer.post_feedforward_norm}
