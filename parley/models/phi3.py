"""Phi-3, Phi-3.5 and Phi-4-mini: Llama's layer with q/k/v and gate/up stored fused (qkv_proj,
gate_up_proj: the layouts our fused projections have anyway), RoPE over part of each head
(partial_rotary_factor), and LongRoPE within the original context (see layers/rotary.py)."""

from __future__ import annotations

import logging

from parley.models.layers.decoder import DecoderModel, hf_activation
from parley.models.llama import all_layers_sliding

log = logging.getLogger("parley.models")


class Phi3ForCausalLM(DecoderModel):
    HF_DEFAULTS = {"rms_norm_eps": 1e-5, "partial_rotary_factor": 1.0, "max_position_embeddings": 4096,
                   "original_max_position_embeddings": 4096}

    @classmethod
    def _family_config(cls, cfg: dict, arch: str) -> dict:
        family = {"hidden_act": hf_activation(cfg, arch), "partial_rotary_factor": cfg["partial_rotary_factor"],
                  **all_layers_sliding(cfg)}
        scaling = cfg.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) in ("longrope", "su", "yarn"):  # HF's aliases
            original, longest = cfg["original_max_position_embeddings"], cfg["max_position_embeddings"]
            family["rope_scaling"] = {**scaling, "rope_type": "longrope", "max_position_embeddings": longest,
                                      "original_max_position_embeddings": original}
            if longest > original:
                log.warning("%s: LongRoPE is served up to the original %d-token context, not %d "
                            "(past it transformers re-rotates every position with the long factors)",
                            arch, original, longest)
                family["max_position_embeddings"] = original
        return family

    def _projection_parts(self, i: int) -> dict[str, list[tuple[str, int]]]:
        c, p = self.config, f"model.layers.{i}."
        return {
            "qkv_weight": [(f"{p}self_attn.qkv_proj", (c.num_heads + 2 * c.num_kv_heads) * c.head_dim)],
            "o_weight": [(f"{p}self_attn.o_proj", c.hidden_size)],
            "gate_up_weight": [(f"{p}mlp.gate_up_proj", 2 * c.intermediate_size)],
            "down_weight": [(f"{p}mlp.down_proj", c.hidden_size)],
        }
