"""Qwen3 (dense): Llama's layer with an RMSNorm over each head of q and k before RoPE."""

from __future__ import annotations

from parley.models.layers.decoder import DecoderModel, hf_activation
from parley.models.llama import qwen_sliding


class Qwen3ForCausalLM(DecoderModel):
    HF_DEFAULTS = {"rms_norm_eps": 1e-6, "attention_bias": False}

    @classmethod
    def _family_config(cls, cfg: dict, arch: str) -> dict:
        return {"hidden_act": hf_activation(cfg, arch), "qk_norm": "head", **qwen_sliding(cfg)}
