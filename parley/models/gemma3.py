"""Gemma 3 (text: Gemma3ForCausalLM, as gemma-3-1b): Gemma 2's layer with an RMSNorm (1 + w) over
each head of q and k, five sliding layers to one global (sliding_window_pattern), the sliding
layers on their own RoPE base (rope_local_base_freq, unscaled), and no soft-capping of the scores
(transformers' Gemma 3 never applies attn_logit_softcapping, nor does llama.cpp)."""

from __future__ import annotations

from parley.models.gemma2 import Gemma2ForCausalLM
from parley.models.layers.decoder import refuse


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    HF_DEFAULTS = {**Gemma2ForCausalLM.HF_DEFAULTS, "rope_theta": 1_000_000.0, "attn_logit_softcapping": None,
                   "final_logit_softcapping": None, "rope_local_base_freq": 10_000.0, "max_position_embeddings": 131072}

    @classmethod
    def _family_config(cls, cfg: dict, arch: str) -> dict:
        refuse(cfg, arch, {"use_bidirectional_attention": (False,)})
        return {**super()._family_config(cfg, arch), "attn_logit_softcap": None, "qk_norm": "head",
                "rope_local_theta": cfg["rope_local_base_freq"]}

    @classmethod
    def _layer_types(cls, cfg: dict) -> tuple[str, ...]:
        n, pattern = cfg["num_hidden_layers"], cfg.get("sliding_window_pattern", 6)
        return tuple(cfg.get("layer_types")
                     or ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)])
