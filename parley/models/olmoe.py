"""OLMoE: Llama's pre-norm layer with q/k RMSNorm over each whole projection, q/k/v optionally
clamped (clip_qkv), and a sparse MoE MLP (norm_topk_prob as configured)."""

from __future__ import annotations

from parley.models.layers.decoder import hf_activation
from parley.models.layers.moe import MoEModel


class OlmoeForCausalLM(MoEModel):
    HF_DEFAULTS = {"rms_norm_eps": 1e-5, "attention_bias": False, "num_experts": 64, "num_experts_per_tok": 8,
                   "norm_topk_prob": False, "clip_qkv": None}

    @classmethod
    def _family_config(cls, cfg: dict, arch: str) -> dict:
        if cfg["num_attention_heads"] * cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"]) != cfg["hidden_size"]:
            raise ValueError(f"{arch}: heads x head_dim must equal hidden_size (transformers' OLMoE assumes it)")
        return {"hidden_act": hf_activation(cfg, arch), "qk_norm": "whole", "clip_qkv": cfg["clip_qkv"],
                "num_experts": cfg["num_experts"], "num_experts_per_tok": cfg["num_experts_per_tok"],
                "moe_intermediate_size": cfg["intermediate_size"], "norm_topk_prob": cfg["norm_topk_prob"]}
