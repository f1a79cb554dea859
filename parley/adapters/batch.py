"""Each step's LoRABatch, built from the adapter of every token in the flat batch.

Stacking the step's adapters copies all their weights, so the stacks of the last few adapter sets
are kept: under steady traffic the same set recurs step after step, and a step only builds its
masks (one small comparison per projection).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from parley.adapters.lora import PROJECTIONS, LoRAWeights, module_shapes
from parley.adapters.ops import LayerLoRA, LoRABatch, LoRAProjection
from parley.adapters.registry import LoRARegistry
from parley.config import ModelConfig
from parley.kernels.linear import prepack


@dataclass(frozen=True)
class _Stack:
    """One projection's weights for a set of adapters, per layer (see LoRAProjection)."""

    a: list[torch.Tensor]  # per layer [W, in], prepacked
    b: list[torch.Tensor]  # per layer [out, W], prepacked
    owner: torch.Tensor  # [W] int64: index, in the set, of the adapter owning each column


class LoRABatcher:
    def __init__(self, registry: LoRARegistry, model: ModelConfig, device: torch.device | str, cache_size: int = 4):
        self.registry = registry
        self.device = device
        self.cache_size = cache_size
        self.num_layers = model.num_layers
        self.rows: dict[str, slice] = {}  # module -> its rows of its fused projection's output
        self.out_features: dict[str, int] = {}  # fused projection -> its output size
        shapes = module_shapes(model)
        for proj, modules in PROJECTIONS.items():
            start = 0
            for module in modules:
                self.rows[module] = slice(start, start + shapes[module][1])
                start += shapes[module][1]
            self.out_features[proj] = start
        self._stacks: OrderedDict[tuple[int, ...], dict[str, _Stack]] = OrderedDict()
        self._generation = registry.generation

    def batch(self, token_loras: list[int]) -> LoRABatch | None:
        """`token_loras`: the lora_id of each token of the flat batch (0: base model). None when no
        token uses an adapter, so the step runs at base speed."""
        ids = tuple(sorted(set(token_loras) - {0}))
        if not ids:
            return None
        stacks = self._stacks_for(ids)
        masks = dict.fromkeys(stacks)  # None: one adapter for every token, nothing to mask
        if len(ids) > 1 or 0 in token_loras:
            position = {lora_id: i for i, lora_id in enumerate(ids)}
            token_owner = torch.tensor([position.get(t, -1) for t in token_loras], device=self.device)  # [N]
            masks = {proj: (token_owner.unsqueeze(1) == s.owner.unsqueeze(0)).to(s.a[0].dtype)  # [N, W]
                     for proj, s in stacks.items()}
        return LoRABatch([
            LayerLoRA(**{proj: LoRAProjection(s.a[i], s.b[i], masks[proj]) for proj, s in stacks.items()})
            for i in range(self.num_layers)
        ])

    def _stacks_for(self, ids: tuple[int, ...]) -> dict[str, _Stack]:
        if self._generation != self.registry.generation:  # an adapter was dropped: free its copies
            self._stacks.clear()
            self._generation = self.registry.generation
        stacks = self._stacks.get(ids)
        if stacks is None:
            stacks = self._stacks[ids] = self._stack([self.registry.weights(i) for i in ids])
            while len(self._stacks) > self.cache_size:
                self._stacks.popitem(last=False)
        self._stacks.move_to_end(ids)
        return stacks

    def _stack(self, adapters: list[LoRAWeights]) -> dict[str, _Stack]:
        stacks = {}
        for proj, modules in PROJECTIONS.items():
            # columns: adapter by adapter, and within an adapter module by module
            parts = [(i, module, w.modules[module]) for i, w in enumerate(adapters) for module in modules
                     if module in w.modules]
            if not parts:
                continue
            a = torch.cat([m.a for _, _, m in parts], dim=1)  # [L, W, in]
            b = a.new_zeros(self.num_layers, self.out_features[proj], a.shape[1])  # [L, out, W]
            owner, column = [], 0
            for i, module, m in parts:
                rank = m.a.shape[1]
                b[:, self.rows[module], column : column + rank] = m.b
                owner += [i] * rank
                column += rank
            stacks[proj] = _Stack([prepack(x) for x in a.unbind(0)], [prepack(x) for x in b.unbind(0)],
                                  torch.tensor(owner, device=self.device))
        return stacks
