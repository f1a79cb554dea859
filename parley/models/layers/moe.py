"""Sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE, OLMoE), batched by expert.

Each token's router logits go through a float32 softmax; its top-k experts are kept, their weights
renormalized to sum to 1 where the family does (norm_topk_prob). The (token, expert) pairs are then
sorted by expert, so each expert that any token of the step chose runs once, as one gated-MLP
matmul pair over all of its rows; the outputs, times their weights, are added back to their tokens
in expert order (as transformers adds them). The Python loop is over the experts, never the tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from parley.adapters.ops import LayerLoRA
from parley.config import ModelConfig
from parley.kernels.linear import linear, prepack
from parley.models.layers.decoder import DecoderLayer, DecoderModel, glu, pack_projection, param


class MoEDecoderLayer(DecoderLayer):
    """Llama's pre-norm layer with a sparse MoE in place of the dense MLP."""

    PROJECTIONS = ("qkv_weight", "o_weight")

    def __init__(self, config: ModelConfig, index: int, *, o_bias: bool):
        super().__init__(config, index, o_bias=o_bias, intermediate_size=0)
        experts, hidden, inter = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.router_weight = param(experts, hidden)
        self.experts_gate_up = param(experts, 2 * inter, hidden)  # each expert's rows: gate, then up
        self.experts_down = param(experts, hidden, inter)

    def prepack(self, quantize: str | None, quantized: dict) -> None:
        """The attention's projections as DecoderLayer does; each expert's two matrices the same way,
        as lists; the router in the model's dtype (4 bits would move tokens to other experts)."""
        super().prepack(quantize, quantized)
        for name in ("experts_gate_up", "experts_down"):
            stacked = getattr(self, name)
            packed = [pack_projection(weight, None, quantize) for weight in stacked]
            delattr(self, name)
            setattr(self, name, packed)
        router = prepack(self.router_weight)
        if router is not self.router_weight:
            delattr(self, "router_weight")
            self.router_weight = router

    def projection_weights(self) -> list:
        return super().projection_weights() + [self.router_weight, *self.experts_gate_up, *self.experts_down]

    def _mlp(self, x: torch.Tensor, lora: LayerLoRA) -> torch.Tensor:
        # LoRA adapters reach no expert (parley/adapters/lora.py refuses experts' modules): a step's
        # lora.gate_up/down are zeros here, for the dense layers of the model.
        n, k = x.shape[0], self.top_k
        probs = torch.softmax(linear(x, self.router_weight), dim=-1, dtype=torch.float32)  # [N, E]
        weights, experts = probs.topk(k, dim=-1)  # [N, K] each
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        order = experts.flatten().argsort(stable=True)  # the N*K (token, choice) pairs by expert
        counts = torch.bincount(experts.flatten(), minlength=len(self.experts_down)).tolist()
        tokens = order // k  # [N*K]: the token of each pair, in that order
        rows = x.index_select(0, tokens)  # [N*K, hidden]
        outputs, start = [], 0
        for expert, count in enumerate(counts):
            if count:
                gate_up = linear(rows[start : start + count], self.experts_gate_up[expert])
                outputs.append(linear(glu(self.act, gate_up), self.experts_down[expert]))  # [count, hidden]
                start += count
        weighted = torch.cat(outputs) * weights.flatten()[order].unsqueeze(1)  # [N*K, hidden]
        return torch.zeros_like(x).index_add_(0, tokens, weighted)  # [N, hidden]


class MoEModel(DecoderModel):
    """A decoder whose layers (those not in config.dense_layers) have a sparse MoE MLP. A family
    names where its router and experts live: MOE (the MLP's module), EXPERT_PARTS (gate, up, down)."""

    MOE = "mlp"
    EXPERT_PARTS = ("gate_proj", "up_proj", "down_proj")

    def _make_layer(self, config: ModelConfig, index: int) -> DecoderLayer:
        if index in config.dense_layers:
            return super()._make_layer(config, index)
        return MoEDecoderLayer(config, index, o_bias=config.attention_bias)

    def _projection_parts(self, i: int) -> dict[str, list[tuple[str, int]]]:
        parts = super()._projection_parts(i)
        if i not in self.config.dense_layers:
            del parts["gate_up_weight"], parts["down_weight"]
        return parts

    def _layer_tensors(self, i: int, layer: DecoderLayer) -> dict[str, torch.Tensor]:
        targets = super()._layer_tensors(i, layer)
        if isinstance(layer, MoEDecoderLayer):
            p, inter = f"model.layers.{i}.{self.MOE}.", self.config.moe_intermediate_size
            gate, up, down = self.EXPERT_PARTS
            targets[f"{p}gate.weight"] = layer.router_weight
            for e in range(self.config.num_experts):
                targets[f"{p}experts.{e}.{gate}.weight"] = layer.experts_gate_up[e].narrow(0, 0, inter)
                targets[f"{p}experts.{e}.{up}.weight"] = layer.experts_gate_up[e].narrow(0, inter, inter)
                targets[f"{p}experts.{e}.{down}.weight"] = layer.experts_down[e]
        return targets
