"""Qwen3-MoE: Qwen3's attention (q/k norm per head) with a sparse MoE MLP in every
decoder_sparse_step-th layer not in mlp_only_layers (those keep a dense one)."""

from __future__ import annotations

from parley.models.layers.decoder import hf_activation
from parley.models.layers.moe import MoEModel


class Qwen3MoeForCausalLM(MoEModel):
    HF_DEFAULTS = {"rms_norm_eps": 1e-6, "attention_bias": False, "num_experts": 128, "num_experts_per_tok": 8,
                   "moe_intermediate_size": 768, "norm_topk_prob": False, "decoder_sparse_step": 1,
                   "mlp_only_layers": []}

    @classmethod
    def _family_config(cls, cfg: dict, arch: str) -> dict:
        step, dense_only = cfg["decoder_sparse_step"], set(cfg["mlp_only_layers"])
        dense = tuple(i for i in range(cfg["num_hidden_layers"])
                      if i in dense_only or cfg["num_experts"] == 0 or (i + 1) % step)
        family = {"hidden_act": hf_activation(cfg, arch), "qk_norm": "head", "num_experts": cfg["num_experts"],
                  "num_experts_per_tok": cfg["num_experts_per_tok"], "moe_intermediate_size": cfg["moe_intermediate_size"],
                  "norm_topk_prob": cfg["norm_topk_prob"], "dense_layers": dense}
        if cfg.get("use_sliding_window") and cfg.get("sliding_window") is not None:  # every layer, as transformers
            family["sliding_window"] = cfg["sliding_window"]
        return family
