"""What the model receives each step to apply the LoRA adapters of a mixed batch, and the op itself.

For each fused projection (qkv, o, gate_up, down) of each layer, the A's of the step's adapters, of
every module the projection holds (q, k, v...), are stacked ([W, in], W = the sum of their ranks):
one matmul gives every token its x A^T for every adapter, a mask [N, W] keeps only the columns of
the token's own adapter (none for the base model), and one more matmul with the B's (scale folded
in, each at its module's rows of the fused output and its own columns) adds the deltas.
No weights are merged, and a step without adapter tokens skips all of it.

Why so few, denser matmuls: on CPU a small matmul costs ~20 us however small, and LoRA's are small;
skipping the zeros (one matmul per adapter, or per module) costs more in calls than it saves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parley.kernels.linear import linear, linear_then


@dataclass(frozen=True)
class LoRAProjection:
    a: torch.Tensor  # [W, in]: the A's of the step's adapters for every module of the projection
    b: torch.Tensor  # [out, W]: their B's, zero outside each one's own columns and module rows
    mask: torch.Tensor | None  # [N, W]: 1 where the column is the token's adapter's; None: every
    # token uses the step's one adapter
    # a and b as parley.kernels.linear.prepack leaves them (packed on CPU in bfloat16)


@dataclass(frozen=True)
class LayerLoRA:
    """One layer's projections; None where no adapter of the step targets the projection."""

    qkv: LoRAProjection | None = None
    o: LoRAProjection | None = None
    gate_up: LoRAProjection | None = None
    down: LoRAProjection | None = None


NO_LORA = LayerLoRA()


@dataclass(frozen=True)
class LoRABatch:
    layers: list[LayerLoRA]  # one per decoder layer


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora: LoRAProjection | None) -> torch.Tensor:
    """linear(x, weight, bias) plus each token's own adapter delta: x A^T B^T, masked per token."""
    if lora is None:
        return linear(x, weight, bias)
    if x.shape[0] == 1:  # batch invariance, as in `linear`
        return lora_linear(x.expand(2, -1), weight, bias, lora)[:1]
    y = linear(x, weight, bias)  # [N, out]
    h = linear(x, lora.a) if lora.mask is None else linear_then(x, lora.a, "mul", lora.mask)  # [N, W]
    return linear_then(h, lora.b, "add", y)  # [N, out] + [N, W] @ [W, out]
