"""Rotary position embeddings: the inverse frequencies of each scaling variant, computed exactly as
transformers does, a cos/sin table built once, and the rotation (HF's rotate-half layout)."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

ROPE_TYPES = ("default", "linear", "llama3", "longrope", "freq_factors")  # the last: llama.cpp's rope_freqs


def rope_parameters(head_dim: int, theta: float, scaling: dict | None,
                    partial_rotary_factor: float = 1.0) -> tuple[torch.Tensor, float]:
    """([rotated dims / 2] float32 inverse frequencies, the factor cos and sin are multiplied by).
    ValueError names a scaling type not in ROPE_TYPES."""
    dim = int(head_dim * partial_rotary_factor)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return 1.0 / (theta**exponents), 1.0
    if kind == "linear":
        return 1.0 / (theta**exponents) / scaling["factor"], 1.0
    if kind == "llama3":
        return _llama3_inv_freq(1.0 / (theta**exponents), scaling), 1.0
    if kind == "freq_factors":  # a GGUF file's rope_freqs.weight: each frequency's divisor (Llama 3's scaling)
        return 1.0 / (theta**exponents) / torch.tensor(scaling["factors"], dtype=torch.float32), 1.0
    if kind == "longrope":
        return _longrope_short(theta**exponents, scaling)
    raise ValueError(f"unsupported rope_scaling type {kind!r}; Parley supports {', '.join(ROPE_TYPES)}")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Low frequencies are divided by `factor`, high ones kept, the band between interpolated.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(is_medium, smoothed, scaled)


def _longrope_short(powers: torch.Tensor, scaling: dict) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3.5, Phi-4-mini) within the original context, where transformers uses the short
    factors; the model's context is capped there (the family's config reader does it), because
    beyond it transformers switches every position, cached keys included, to the long factors.
    `scaling` holds original_max_position_embeddings and the config's max_position_embeddings."""
    original, longest = scaling["original_max_position_embeddings"], scaling["max_position_embeddings"]
    factor = longest / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    short = torch.tensor(scaling["short_factor"], dtype=torch.float32)
    return 1.0 / (short * powers), attention_factor


class RotaryTable(nn.Module):
    """cos and sin of every position up to `max_positions`, [max_positions, rotated dims / 2], in
    float32 until the model is cast (then in its dtype, like HF's cos.to(x.dtype))."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None, max_positions: int,
                 partial_rotary_factor: float = 1.0):
        super().__init__()
        inv_freq, attention_factor = rope_parameters(head_dim, theta, scaling, partial_rotary_factor)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [max_positions, R/2]
        cos, sin = freqs.cos(), freqs.sin()
        if attention_factor != 1.0:
            cos, sin = cos * attention_factor, sin * attention_factor
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)


class Rope:
    """One step's rotation by one table: the table's cos and sin [max_positions, R/2] and each
    token's position [N] int64. The attention kernel rotates from these (parley/kernels/
    attention.py); `apply` looks the positions up once a step, for every layer."""

    def __init__(self, table: RotaryTable, positions: torch.Tensor):
        self.cos, self.sin, self.positions = table.cos, table.sin, positions

    @functools.cached_property
    def _pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[self.positions].unsqueeze(1), self.sin[self.positions].unsqueeze(1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, heads, D] rotated, a new tensor."""
        return apply_rope(x, *self._pair)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF layout) of the first 2 * cos.shape[-1] dims of each head, the others kept.
    x [N, heads, D]; cos, sin [N, 1, R/2]."""
    rotated = 2 * cos.shape[-1]
    if rotated != x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rotated], cos, sin), x[..., rotated:]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)  # [N, heads, D/2] each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
