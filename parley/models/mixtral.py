"""Mixtral: Mistral's layer with a sparse MoE MLP (block_sparse_moe: experts w1 gate, w3 up, w2
down), the top-k experts' weights always renormalized."""

from __future__ import annotations

from parley.models.layers.decoder import hf_activation
from parley.models.layers.moe import MoEModel
from parley.models.llama import all_layers_sliding


class MixtralForCausalLM(MoEModel):
    HF_DEFAULTS = {"rms_norm_eps": 1e-5, "rope_theta": 1e6, "num_local_experts": 8, "num_experts_per_tok": 2}
    MOE = "block_sparse_moe"
    EXPERT_PARTS = ("w1", "w3", "w2")

    @classmethod
    def _family_config(cls, cfg: dict, arch: str) -> dict:
        return {"hidden_act": hf_activation(cfg, arch), "num_experts": cfg["num_local_experts"],
                "num_experts_per_tok": cfg["num_experts_per_tok"], "moe_intermediate_size": cfg["intermediate_size"],
                "norm_topk_prob": True, **all_layers_sliding(cfg)}
