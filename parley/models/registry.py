"""The architecture registry: an HF `architectures` name -> the module and class that serve it.
A family is one file in parley/models/ plus its row here; modules are imported when first used."""

from __future__ import annotations

import importlib

from parley.config import ModelConfig
from parley.models.layers.decoder import DecoderModel

ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "Olmo2ForCausalLM": ("olmo2", "Olmo2ForCausalLM"),
    "GraniteForCausalLM": ("granite", "GraniteForCausalLM"),
    "Phi3ForCausalLM": ("phi3", "Phi3ForCausalLM"),
    "Gemma2ForCausalLM": ("gemma2", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "OlmoeForCausalLM": ("olmoe", "OlmoeForCausalLM"),
}


def model_class(architecture: str) -> type[DecoderModel]:
    """ValueError for an architecture Parley does not serve, listing those it does."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {architecture!r}; Parley serves {', '.join(ARCHITECTURES)}")
    module, name = ARCHITECTURES[architecture]
    return getattr(importlib.import_module(f"parley.models.{module}"), name)


def config_from_hf(cfg: dict) -> ModelConfig:
    """The ModelConfig of an HF config.json, read by its family (which refuses what it does not serve)."""
    archs = cfg.get("architectures") or [cfg.get("model_type", "unknown")]
    return model_class(archs[0]).config_from_hf(cfg)
