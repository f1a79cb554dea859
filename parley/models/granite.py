"""Granite 3: Llama's layer with its four multipliers: the embeddings', each residual branch's, the
attention scores' (in place of 1/sqrt(head_dim)) and the logits' divisor."""

from __future__ import annotations

import torch

from parley.adapters.ops import NO_LORA, LayerLoRA
from parley.config import ModelConfig
from parley.kernels.norm import rms_norm
from parley.models.attention import AttentionMetadata
from parley.models.layers.decoder import DecoderLayer, DecoderModel, hf_activation, refuse


class GraniteDecoderLayer(DecoderLayer):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__(config, index, o_bias=config.attention_bias)
        self.residual_scale = config.residual_scale

    def forward(self, delta, hidden, rope, k_cache, v_cache, meta: AttentionMetadata,
                lora: LayerLoRA = NO_LORA) -> tuple[torch.Tensor, torch.Tensor]:
        x, hidden = rms_norm(delta, hidden, self.input_norm, self.eps)
        delta = self._attention(x, rope, k_cache, v_cache, meta, lora) * self.residual_scale
        x, hidden = rms_norm(delta, hidden, self.post_attention_norm, self.eps)
        return self._mlp(x, lora) * self.residual_scale, hidden


class GraniteForCausalLM(DecoderModel):
    HF_DEFAULTS = {"rms_norm_eps": 1e-6, "attention_bias": False, "embedding_multiplier": 1.0,
                   "residual_multiplier": 1.0, "attention_multiplier": 1.0, "logits_scaling": 1.0}

    @classmethod
    def _family_config(cls, cfg: dict, arch: str) -> dict:
        refuse(cfg, arch, {"mlp_bias": (False,)})
        return {"hidden_act": hf_activation(cfg, arch), "embedding_scale": cfg["embedding_multiplier"],
                "residual_scale": cfg["residual_multiplier"], "attention_scale": cfg["attention_multiplier"],
                "logits_divisor": cfg["logits_scaling"]}

    def _make_layer(self, config: ModelConfig, index: int) -> DecoderLayer:
        return GraniteDecoderLayer(config, index)
