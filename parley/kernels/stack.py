"""A stack of pre-norm decoder layers (Llama's) and the final norm in one call of _stack.c a step,
for bfloat16 models whose projections run on _quant.c (4 or 8 bits) and whose attention runs on
_attention.c: the same kernels, in the same order, as parley/models/layers/decoder.py calls them
one by one, so the same bits, without ~25 Python calls a layer (see _stack.c)."""

from __future__ import annotations

from dataclasses import dataclass

import torch  # before _stack, as for the other kernels

from parley.kernels import attention
from parley.kernels.linear import QuantWeight

try:
    from parley.kernels import _stack
except (ImportError, AttributeError):  # not built here (see setup.py), or a kernel it calls not built
    _stack = None


@dataclass(frozen=True)
class StackLayer:
    """One layer's tensors: bf16, contiguous; the caches as parley/kernels/attention.py's attend takes them."""

    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    qkv: QuantWeight  # rows: q, then k, then v
    qkv_bias: torch.Tensor | None
    o: QuantWeight
    o_bias: torch.Tensor | None
    gate_up: QuantWeight  # rows: gate, then up
    down: QuantWeight
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    window: int | None  # a sliding layer's


def available() -> bool:
    return _stack is not None and _stack.supported()


class LayerStack:
    """The layers of one model with its caches, laid out once as the kernel reads them."""

    def __init__(self, layers: list[StackLayer], final_norm: torch.Tensor, *, heads: int, kv_heads: int,
                 head_dim: int, eps: float, scale: float, softcap: float | None):
        hidden, inter = final_norm.shape[0], layers[0].down.in_features
        shapes = {"input_norm": (hidden,), "post_attention_norm": (hidden,), "qkv_bias": ((heads + 2 * kv_heads) * head_dim,),
                  "o_bias": (hidden,)}
        weights = {"qkv": ((heads + 2 * kv_heads) * head_dim, hidden), "o": (hidden, heads * head_dim),
                   "gate_up": (2 * inter, hidden), "down": (hidden, inter)}
        cache = layers[0].k_cache
        for layer in layers:
            tensors = [getattr(layer, name) for name in shapes if getattr(layer, name) is not None]
            if not (all(getattr(layer, name) is None or getattr(layer, name).shape == shape for name, shape in shapes.items())
                    and all(getattr(layer, name).shape == shape for name, shape in weights.items())
                    and all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in tensors + [layer.k_cache, layer.v_cache])
                    and layer.k_cache.shape == layer.v_cache.shape == cache.shape == (kv_heads, *cache.shape[1:3], head_dim)):
                raise ValueError("LayerStack: unexpected layer layout")
        if not (final_norm.dtype == torch.bfloat16 and final_norm.is_contiguous()):
            raise ValueError("LayerStack: unexpected final norm")
        layouts = {getattr(layer, name).amx for layer in layers for name in weights}
        if len(layouts) != 1:
            raise ValueError("LayerStack: projections packed for both the AMX and the VNNI path")

        def address(t):
            return 0 if t is None else t.data_ptr()

        self.table = torch.tensor([  # _stack.c's LAYER_FIELDS, in order
            [address(x.input_norm), address(x.post_attention_norm), x.qkv.ptr, x.qkv.bits, address(x.qkv_bias),
             x.o.ptr, x.o.bits, address(x.o_bias), x.gate_up.ptr, x.gate_up.bits, x.down.ptr, x.down.bits,
             address(x.k_cache), address(x.v_cache), x.window or 0] for x in layers], dtype=torch.int64)
        self.layers, self.final_norm = layers, final_norm  # the tensors the table points into, kept alive
        self.shape = (hidden, inter, heads, kv_heads, head_dim)
        self.eps, self.scale, self.softcap = eps, scale, softcap or 0.0
        self.quant_amx = layouts.pop()
        self.num_blocks, self.block_size = cache.shape[1], cache.shape[2]

    def __call__(self, embeddings: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor, seq: torch.Tensor,
                 keys: torch.Tensor, rope) -> torch.Tensor:
        """The final norm's output [N, hidden] for the embeddings [N, hidden]; the step's rows as attend takes them."""
        hidden, inter, heads, kv_heads, head_dim = self.shape
        rows = embeddings.shape[0]
        if not (embeddings.dtype == torch.bfloat16 and embeddings.is_contiguous() and embeddings.shape == (rows, hidden)):
            raise ValueError("LayerStack: unexpected embeddings")
        attention.check_step(rows, slots, tables, seq, keys, rope, torch.bfloat16)
        out = torch.empty(rows, hidden, dtype=torch.bfloat16)
        _stack.forward(torch.get_num_threads(), rows, hidden, inter, heads, kv_heads, head_dim, self.eps, self.scale,
                         self.softcap, self.quant_amx, attention.use_amx(), self.table.data_ptr(), len(self.layers),
                         self.num_blocks, self.block_size, embeddings.data_ptr(), self.final_norm.data_ptr(),
                         out.data_ptr(), tables.data_ptr(), tables.shape[0], tables.stride(0), seq.data_ptr(),
                         keys.data_ptr(), slots.data_ptr(), rope.cos.data_ptr(), rope.sin.data_ptr(), rope.cos.shape[0],
                         rope.cos.shape[1], rope.positions.data_ptr())
        return out
