"""Each step's LoRABatch, built from the adapter of every token in the flat batch.

Segmented (the CPU kernel, parley/kernels/lora.py): each adapter is packed for the kernel once, on
its first step, and a step only groups its tokens by adapter. Stacked (everywhere else): stacking
the step's adapters copies all their weights, so the stacks of the last few adapter sets are kept:
under steady traffic the same set recurs step after step, and a step only builds its masks (one
small comparison per projection).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from parley.adapters.lora import PROJECTIONS, LoRAWeights, module_shapes
from parley.adapters.ops import LayerLoRA, LoRABatch, SegmentedLoRA, StackedLoRA
from parley.adapters.registry import LoRARegistry
from parley.config import ModelConfig
from parley.kernels import lora as lora_kernel
from parley.kernels.linear import prepack


@dataclass(frozen=True)
class _Stack:
    """One projection's weights for a set of adapters, per layer (see LoRAProjection)."""

    a: list[torch.Tensor]  # per layer [W, in], prepacked
    b: list[torch.Tensor]  # per layer [out, W], prepacked
    owner: torch.Tensor  # [W] int64: index, in the set, of the adapter owning each column


class LoRABatcher:
    def __init__(self, registry: LoRARegistry, model: ModelConfig, device: torch.device | str,
                 dtype: torch.dtype = torch.float32, cache_size: int = 4):
        self.registry = registry
        self.device = device
        self.segmented = lora_kernel.available(device, dtype)
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
        # per adapter set: its stacks (stacked) or its packed LoRAs' addresses (segmented)
        self._sets: OrderedDict[tuple[int, ...], dict] = OrderedDict()
        self._packed: dict[int, list[dict[str, lora_kernel.PackedLoRA]]] = {}  # lora_id -> per layer
        self._generation = registry.generation

    def batch(self, token_loras: list[int]) -> LoRABatch | None:
        """`token_loras`: the lora_id of each token of the flat batch (0: base model). None when no
        token uses an adapter, so the step runs at base speed."""
        ids = tuple(sorted(set(token_loras) - {0}))
        if not ids:
            return None
        if self._generation != self.registry.generation:  # an adapter was dropped: free its copies
            self._sets.clear()
            self._packed = {i: p for i, p in self._packed.items() if self.registry.has_weights(i)}
            self._generation = self.registry.generation
        return self._segmented(ids, token_loras) if self.segmented else self._stacked(ids, token_loras)

    def _for_set(self, ids: tuple[int, ...], build: Callable[[tuple[int, ...]], dict]) -> dict:
        found = self._sets.get(ids)
        if found is None:
            found = self._sets[ids] = build(ids)
            while len(self._sets) > self.cache_size:
                self._sets.popitem(last=False)
        self._sets.move_to_end(ids)
        return found

    def _segmented(self, ids: tuple[int, ...], token_loras: list[int]) -> LoRABatch:
        addresses = self._for_set(ids, self._addresses)
        slot = {lora_id: i for i, lora_id in enumerate(ids)}
        tokens = lora_kernel.token_blocks([slot.get(t, -1) for t in token_loras], len(ids))
        return LoRABatch([LayerLoRA(**{proj: SegmentedLoRA(tokens, a[i]) for proj, a in addresses.items()})
                          for i in range(self.num_layers)])

    def _addresses(self, ids: tuple[int, ...]) -> dict[str, list[torch.Tensor]]:
        """Per projection an adapter of the set targets, per layer: each adapter's packed LoRA address (0: none)."""
        packed = [self._packed_for(lora_id) for lora_id in ids]
        return {proj: [torch.tensor([p[i][proj].address if proj in p[i] else 0 for p in packed], dtype=torch.int64)
                       for i in range(self.num_layers)]
                for proj in PROJECTIONS if any(proj in p[0] for p in packed)}

    def _packed_for(self, lora_id: int) -> list[dict[str, lora_kernel.PackedLoRA]]:
        packed = self._packed.get(lora_id)
        if packed is None:
            weights = self.registry.weights(lora_id)
            packed = self._packed[lora_id] = [
                {proj: lora_kernel.pack([(weights.modules[m].a[i], weights.modules[m].b[i], self.rows[m].start)
                                         for m in modules if m in weights.modules])
                 for proj, modules in PROJECTIONS.items() if any(m in weights.modules for m in modules)}
                for i in range(self.num_layers)]
        return packed

    def _stacked(self, ids: tuple[int, ...], token_loras: list[int]) -> LoRABatch:
        stacks = self._for_set(ids, lambda ids: self._stack([self.registry.weights(i) for i in ids]))
        masks = dict.fromkeys(stacks)  # None: one adapter for every token, nothing to mask
        if len(ids) > 1 or 0 in token_loras:
            position = {lora_id: i for i, lora_id in enumerate(ids)}
            token_owner = torch.tensor([position.get(t, -1) for t in token_loras], device=self.device)  # [N]
            masks = {proj: (token_owner.unsqueeze(1) == s.owner.unsqueeze(0)).to(s.a[0].dtype)  # [N, W]
                     for proj, s in stacks.items()}
        return LoRABatch([
            LayerLoRA(**{proj: StackedLoRA(s.a[i], s.b[i], masks[proj]) for proj, s in stacks.items()})
            for i in range(self.num_layers)
        ])

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
