"""y = x W^T (+ b): the projection every layer and LoRA adapter runs, batch-invariant and prepacked on CPU.

Prepacked: F.linear hands oneDNN a plain weight, which oneDNN lays out into its blocked format again
on every call. On CPU in bfloat16 `prepack` does that once at load and `linear` runs the same
kernel on the packed weight: 1.5-2.5x faster per projection here (a 135M model's step at batch 32:
86 -> 67 ms), with bit-identical results. float32 is packed for oneDNN too: F.linear would run
MKL's sgemm, whose summation order changes with the number of rows (a row rounds differently at
8 rows than at 2), while oneDNN's packed kernel keeps it, and is faster here at every size (576 x
1536 at 2 / 32 / 512 rows: 141 / 389 / 4635 us for sgemm, 45 / 278 / 4052 us packed; the lm_head
at 2 rows: 23.7 against 4.9 ms). Other devices keep their plain weight.

Batch-invariant: for a single row, oneDNN's kernel (gemv) sums a long inner dimension (1536 here)
in another order than for several rows (gemm), so a token decoded alone would round differently
from the same token in a batch or in a draft verification. A lone row is computed as two
identical rows, which costs about the same. From two rows on, oneDNN's AVX-512 brgemm kernels give
a row the same bits whatever rows are beside it. Its AMX tile kernels (Intel Xeon 4th gen on) do
up to a number of rows, so there a batch runs in calls of at most 128 rows (`rows_per_call`): a
decode step at 32 sequences took 126 ms that way on a Xeon against 203 ms with oneDNN kept off AMX.

Int4 (`--quantize int4`, `quantize_int4`): 4-bit weights in groups of 32 along the input, as
GGUF's Q4_1 keeps them, run by torch's weight-only int4 CPU kernel. A decode step reads a quarter
of the bytes, which is what bounds it at small batches; at 8 rows and more the kernel's
dequantizing costs more than it saves. It computes each row on its own, so it is batch-invariant.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

INT4_GROUP = 32
AMX_ROWS = 128  # see rows_per_call

log = logging.getLogger("parley.kernels")
_rows_per_call: int | None = None  # see rows_per_call


@dataclass(frozen=True)
class Int4Weight:
    """w[o, i] = (q[o, i] - 8) * scale[i / 32, o] + zero[i / 32, o], q in 0..15 (torch's int4 CPU layout)."""

    packed: torch.Tensor  # uint8 [out, in / 2], from _convert_weight_to_int4pack_for_cpu
    scales_and_zeros: torch.Tensor  # [in / 32, out, 2], in the model's dtype

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2


def can_quantize_int4(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dim() == 2 and weight.shape[1] % INT4_GROUP == 0


def quantize_int4(weight: torch.Tensor) -> Int4Weight:
    """Each group of 32 inputs of each output on 16 even steps from its min to its max. Weights
    dequantized from GGUF Q4_1 lie on such a grid already (Q4_1 maps a block's min to 0 and its
    max to 15), so they come back to their own 4-bit values, but for the rounding of the scale and
    zero to the weight's dtype."""
    out_features, in_features = weight.shape
    groups = weight.float().view(out_features, in_features // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(-1), groups.amax(-1)  # [out, groups]
    scale = ((high - low) / 15).to(weight.dtype).float()  # the kernel takes them in x's dtype
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: any scale
    zero = (low + 8 * scale).to(weight.dtype).float()
    q = torch.round((groups - zero.unsqueeze(-1)) / scale.unsqueeze(-1) + 8).clamp(0, 15)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(out_features, in_features).int(), 1)
    scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(weight.dtype).contiguous()  # [groups, out, 2]
    return Int4Weight(packed, scales_and_zeros)


def prepack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in] in the layout `linear` runs fastest on: packed for oneDNN on CPU in bfloat16
    and float32, unchanged elsewhere. Packing copies it; the caller drops the plain weight if it needs
    it no more."""
    if weight.device.type == "cpu" and (
        (weight.dtype == torch.bfloat16 and _onednn_bf16())
        or (weight.dtype == torch.float32 and torch.backends.mkldnn.is_available())
    ):
        # on AMX, laid out as for one row (batch_size=1): oneDNN then sums a row in the same order
        # at 1 to 192 rows (its default layout: at 1 to 32), as fast at 512 rows (rows_per_call)
        hint = 1 if weight.dtype == torch.bfloat16 and _amx_in_use() else None
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), hint)
    return weight


def linear(x: torch.Tensor, weight: torch.Tensor | Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, in] @ weight^T (+ bias) -> [N, out]; `weight` plain, from `prepack` or `quantize_int4`."""
    if isinstance(weight, Int4Weight):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), weight.packed, INT4_GROUP,
                                                       weight.scales_and_zeros)
        return y if bias is None else y + bias
    if x.shape[0] == 1:
        return linear(x.expand(2, -1), weight, bias)[:1]
    if x.shape[0] > rows_per_call():
        return torch.cat([linear(part, weight, bias) for part in x.split(rows_per_call())])
    return _projection(x, weight, bias)


def linear_then(x: torch.Tensor, weight: torch.Tensor, op: str, other: torch.Tensor) -> torch.Tensor:
    """(x @ weight^T) `op` other, for op "add" or "mul" and other [N, out]: one fused call on a packed
    weight, rounded once (a sum like addmm's; a product by anything but 0/1 can round differently
    from the unfused plain path). Callers keep x at two rows or more (see `linear`)."""
    if x.shape[0] > rows_per_call():
        parts = zip(x.split(rows_per_call()), other.split(rows_per_call()))
        return torch.cat([linear_then(part, weight, op, other_part) for part, other_part in parts])
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, None, op)
    if op == "add":
        return torch.addmm(other, x, weight.t())
    return F.linear(x, weight).mul_(other)


def projection_kernel(dtype: torch.dtype) -> str:
    """What runs the CPU projections, for the start-up log."""
    if dtype == torch.float32 and torch.backends.mkldnn.is_available():
        return "oneDNN (float32)"
    if dtype != torch.bfloat16:
        return f"torch ({dtype})"
    if not _onednn_bf16():
        return "torch's reference bf16 kernels (no AVX-512 on this CPU)"
    if _amx_in_use():
        return f"oneDNN with AMX tiles, {rows_per_call()} rows per call"
    return f"oneDNN up to {os.environ.get('ONEDNN_MAX_CPU_ISA', 'AVX-512')}"


def rows_per_call() -> int:
    """At most this many rows per oneDNN call. Its AMX kernels change the order in which they sum a
    row with the number of rows: on a Xeon, for the default model's projection shapes packed as
    `prepack` packs them, a row kept its bits at 1 to 192 rows per call (1 or 2 threads), not at
    193-256 rows of the 1536-wide down projection; the attention's probs@values (at most 512 keys,
    a multiple of 32, see models/attention.py) kept them up to 600 rows. Hence 128, with margin.
    A layer's projections at 512 rows: 4.4 ms in 128-row calls, 2.6 ms in one call, 7.6 ms in the
    32-row calls the default layout needed. Its AVX-512 kernels keep a row's bits at any number of rows.
    oneDNN reads ONEDNN_MAX_CPU_ISA once, so this is decided once too (`check_rows_per_call` may
    lower it for a model's shapes)."""
    global _rows_per_call
    if _rows_per_call is None:
        _rows_per_call = AMX_ROWS if _amx_in_use() else 1 << 62
    return _rows_per_call


def check_rows_per_call(weights: list[torch.Tensor]) -> None:
    """Where batches are split (AMX), check on each weight shape of a model that a row gets the same
    bits in a call of rows_per_call() rows as in a call of two: the limit was measured on the default
    model's shapes only. Where one does not, split at 32 rows, as far as the default layout held,
    and say so; if even that fails, say that outputs may depend on the batch."""
    global _rows_per_call
    if rows_per_call() != AMX_ROWS:
        return
    shapes = {tuple(w.shape): w for w in weights}
    for limit in (AMX_ROWS, 32):
        if all(_keeps_rows(weight, limit) for weight in shapes.values()):
            if limit != AMX_ROWS:
                log.warning("oneDNN's AMX kernels keep a row's bits only in calls of %d rows for this model", limit)
            _rows_per_call = limit
            return
    _rows_per_call = 32
    log.error("oneDNN's AMX kernels round a row differently with the rows beside it for this model's shapes: "
              "outputs may depend on the batch; ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 avoids AMX")


def _keeps_rows(weight: torch.Tensor, rows: int) -> bool:
    x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    whole = _projection(x, weight)
    return all(torch.equal(_projection(x[r : r + 2], weight), whole[r : r + 2]) for r in range(0, rows, 2))


def _projection(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """One call of the kernel `linear` runs, whatever the number of rows."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _amx_in_use() -> bool:
    """Whether oneDNN may run bf16 on AMX tiles here: the CPU has them and ONEDNN_MAX_CPU_ISA allows them."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return _onednn_bf16() and torch.cpu._is_amx_tile_supported() and (isa in ("ALL", "DEFAULT") or "AMX" in isa)


def _onednn_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
