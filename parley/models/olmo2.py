"""OLMo 2: norms after the attention and the MLP (not before), and an RMSNorm over each whole q and
k projection before RoPE."""

from __future__ import annotations

import torch

from parley.adapters.ops import NO_LORA, LayerLoRA
from parley.config import ModelConfig
from parley.kernels.norm import rms_norm
from parley.models.attention import AttentionMetadata
from parley.models.layers.decoder import DecoderLayer, DecoderModel, hf_activation, param


class Olmo2DecoderLayer(DecoderLayer):
    """h + norm(attention(h)), then h + norm(mlp(h)); post_attention_norm is the first of the two."""

    def __init__(self, config: ModelConfig, index: int):
        super().__init__(config, index, o_bias=config.attention_bias)
        del self.input_norm
        self.post_feedforward_norm = param(config.hidden_size)

    def forward(self, delta, hidden, rope, k_cache, v_cache, meta: AttentionMetadata,
                lora: LayerLoRA = NO_LORA) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = delta if hidden is None else hidden + delta
        attention = self._attention(hidden, rope, k_cache, v_cache, meta, lora)
        hidden = hidden + rms_norm(attention, None, self.post_attention_norm, self.eps)[0]
        return rms_norm(self._mlp(hidden, lora), None, self.post_feedforward_norm, self.eps)[0], hidden


class Olmo2ForCausalLM(DecoderModel):
    HF_DEFAULTS = {"rms_norm_eps": 1e-5, "attention_bias": False}

    @classmethod
    def _family_config(cls, cfg: dict, arch: str) -> dict:
        return {"hidden_act": hf_activation(cfg, arch), "qk_norm": "whole"}

    def _make_layer(self, config: ModelConfig, index: int) -> DecoderLayer:
        return Olmo2DecoderLayer(config, index)

    def _layer_tensors(self, i: int, layer: DecoderLayer) -> dict[str, torch.Tensor]:
        p = f"model.layers.{i}."
        targets = {f"{p}post_attention_layernorm.weight": layer.post_attention_norm,
                   f"{p}post_feedforward_layernorm.weight": layer.post_feedforward_norm,
                   f"{p}self_attn.q_norm.weight": layer.q_norm, f"{p}self_attn.k_norm.weight": layer.k_norm}
        if layer.o_bias is not None:
            targets[f"{p}self_attn.o_proj.bias"] = layer.o_bias
        return targets
