"""Llama 2/3 (SmolLM), Mistral and Qwen2: the pre-norm decoder of parley/models/layers/decoder.py as
it is. Mistral's sliding window and Qwen2's (use_sliding_window, max_window_layers) are honoured."""

from __future__ import annotations

from parley.config import ModelConfig
from parley.models.layers.decoder import DecoderLayer, DecoderModel, hf_activation, refuse


def all_layers_sliding(cfg: dict) -> dict:
    """Mistral, Mixtral, Phi-3: every layer slides when sliding_window is set."""
    return {"sliding_window": cfg.get("sliding_window")}


def qwen_sliding(cfg: dict) -> dict:
    """Qwen2/Qwen3: layers from max_window_layers on slide when use_sliding_window (or as layer_types says)."""
    if not cfg.get("use_sliding_window") or cfg.get("sliding_window") is None:
        return {}
    layers, first = cfg["num_hidden_layers"], cfg.get("max_window_layers", 28)
    types = cfg.get("layer_types") or ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    return {"sliding_window": cfg["sliding_window"], "layer_types": tuple(types)}


class LlamaForCausalLM(DecoderModel):
    HF_DEFAULTS = {"rms_norm_eps": 1e-6}

    @classmethod
    def _family_config(cls, cfg: dict, arch: str) -> dict:
        refuse(cfg, arch, {"mlp_bias": (False,)})
        family = {"hidden_act": hf_activation(cfg, arch)}
        if arch == "MistralForCausalLM":
            family.update(all_layers_sliding(cfg))
        if arch == "Qwen2ForCausalLM":
            family.update(qwen_sliding(cfg), attention_bias=True)  # Qwen2 always has q/k/v biases
        return family

    def _make_layer(self, config: ModelConfig, index: int) -> DecoderLayer:
        # Llama puts a bias on o_proj too when attention_bias is set; Qwen2 only on q/k/v.
        o_bias = config.attention_bias and config.architecture != "Qwen2ForCausalLM"
        return DecoderLayer(config, index, o_bias=o_bias)
