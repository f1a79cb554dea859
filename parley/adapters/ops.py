"""What the model receives each step to apply the LoRA adapters of a mixed batch, and the op itself.

Two ways to give each token its own adapter's delta on a fused projection (qkv, o, gate_up, down):

- SegmentedLoRA, on CPUs with AVX512-BF16 in bfloat16: parley/kernels/lora.py computes each
  token's delta with its adapter's weights only, in one call per projection.
- StackedLoRA, everywhere else: the A's of the step's adapters, of every module the projection
  holds (q, k, v...), are stacked ([W, in], W = the sum of their ranks); one matmul gives every
  token its x A^T for every adapter, a mask [N, W] keeps only the columns of the token's own adapter
  (none for the base model), and one more matmul with the B's (scale folded in, each at its
  module's rows of the fused output and its own columns) adds the deltas. On CPU a small matmul
  costs ~12-20 us however small, so few dense calls beat skipping the zeros with many.

No weights are merged, and a step without adapter tokens skips all of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parley.kernels.linear import linear, linear_then
from parley.kernels.lora import TokenBlocks, add_deltas


@dataclass(frozen=True)
class StackedLoRA:
    a: torch.Tensor  # [W, in]: the A's of the step's adapters for every module of the projection
    b: torch.Tensor  # [out, W]: their B's, zero outside each one's own columns and module rows
    mask: torch.Tensor | None  # [N, W]: 1 where the column is the token's adapter's; None: every
    # token uses the step's one adapter
    # a and b as parley.kernels.linear.prepack leaves them (packed on CPU in bfloat16)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] == 1:  # batch invariance, as in `linear`
            return self.linear(x.expand(2, -1), weight, bias)[:1]
        y = linear(x, weight, bias)  # [N, out]
        h = linear(x, self.a) if self.mask is None else linear_then(x, self.a, "mul", self.mask)  # [N, W]
        return linear_then(h, self.b, "add", y)  # [N, out] + [N, W] @ [W, out]


@dataclass(frozen=True)
class SegmentedLoRA:
    tokens: TokenBlocks  # the step's tokens by adapter
    addresses: torch.Tensor  # int64 [adapters of the step]: each one's packed LoRA on this projection

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return add_deltas(x, linear(x, weight, bias), self.tokens, self.addresses)


@dataclass(frozen=True)
class LayerLoRA:
    """One layer's projections; None where no adapter of the step targets the projection."""

    qkv: StackedLoRA | SegmentedLoRA | None = None
    o: StackedLoRA | SegmentedLoRA | None = None
    gate_up: StackedLoRA | SegmentedLoRA | None = None
    down: StackedLoRA | SegmentedLoRA | None = None


NO_LORA = LayerLoRA()


@dataclass(frozen=True)
class LoRABatch:
    layers: list[LayerLoRA]  # one per decoder layer


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora: StackedLoRA | SegmentedLoRA | None) -> torch.Tensor:
    """linear(x, weight, bias) plus each token's own adapter delta x A^T B^T."""
    return linear(x, weight, bias) if lora is None else lora.linear(x, weight, bias)
