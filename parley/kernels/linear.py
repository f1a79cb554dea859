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

4- and 8-bit weights (GGUF's Q4_0/Q4_1/Q8_0 matrices, or any projection with `--quantize int4`): on
CPUs with AVX512-BF16 in bfloat16, parley/kernels/_quant.c runs them from their bits at every number
of rows, batch-invariant by construction (see there). A batch-1 decode step reads a quarter of the
bytes. Without AMX, the weights multiply activations rounded to 8 bits per 32 inputs, as
llama.cpp's do (4-bit, 512 rows: 3.8x faster than bf16 on dpbf16; the quality: BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch  # before _quant: the kernel then shares torch's OpenMP runtime (see setup.py)
import torch.nn.functional as F

try:
    from parley.kernels import _quant
except ImportError:  # not built here (see setup.py)
    _quant = None

GROUP, BLOCK = 32, 16  # inputs per d (and m) of a GGUF block; outputs per block of the kernel
AMX_ROWS = 128  # see rows_per_call

log = logging.getLogger("parley.kernels")
_rows_per_call: int | None = None  # see rows_per_call


@dataclass(frozen=True)
class Q4Rows:
    """Weights [out, in] as GGUF's Q4_1 keeps them: w[o, i] = d[o, i / 32] * q[o, i] + m[o, i / 32]."""

    q: torch.Tensor  # uint8 [out, in], 0..15
    d: torch.Tensor  # float16 [out, in / 32]
    m: torch.Tensor  # float16 [out, in / 32]

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in]: d * q is exact in float32, so each weight is rounded once, as gguf's."""
        groups = self.q.view(self.q.shape[0], -1, GROUP).float()
        return (groups * self.d.float().unsqueeze(-1) + self.m.float().unsqueeze(-1)).view(self.q.shape)

    @staticmethod
    def cat(parts: list[Q4Rows]) -> Q4Rows:
        """The parts' rows one after another, as a fused projection holds them."""
        return Q4Rows(*(torch.cat([getattr(p, f) for p in parts]) for f in ("q", "d", "m")))


@dataclass(frozen=True)
class Q8Rows:
    """Weights [out, in] as GGUF's Q8_0 keeps them: w[o, i] = d[o, i / 32] * q[o, i]."""

    q: torch.Tensor  # int8 [out, in]
    d: torch.Tensor  # float16 [out, in / 32]

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in]: d * q is exact in float32, the bits gguf gives."""
        groups = self.q.view(self.q.shape[0], -1, GROUP).float()
        return (groups * self.d.float().unsqueeze(-1)).view(self.q.shape)

    @staticmethod
    def cat(parts: list[Q8Rows]) -> Q8Rows:
        return Q8Rows(torch.cat([p.q for p in parts]), torch.cat([p.d for p in parts]))


QuantRows = Q4Rows | Q8Rows


@dataclass(frozen=True)
class QuantWeight:
    """4- or 8-bit weights packed for parley/kernels/_quant.c: per 16 outputs and two groups of 32
    inputs, d (and m) fp16, then the values in the kernel's order (see there)."""

    data: torch.Tensor  # uint8 [out / 16, ceil(in / 64), 640 (4 bits) or 1088 (8 bits)]
    in_features: int
    bits: int
    amx: bool  # laid out for the AMX tiles, else for VNNI: the path every call on it takes (see `pack`)
    # what each call passes, kept: a one-row step makes 121 calls, Python's share of it counts
    out_features: int = field(init=False)
    ptr: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_features", self.data.shape[0] * BLOCK)
        object.__setattr__(self, "ptr", self.data.data_ptr())

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features


def quantize_q4(weight: torch.Tensor) -> Q4Rows:
    """Each 32 inputs of each output on 16 even steps from their min to their max, as Q4_1 does
    (for `--quantize int4`)."""
    out_features, in_features = weight.shape
    groups = weight.float().view(out_features, in_features // GROUP, GROUP)
    low = groups.amin(-1).half()
    d = ((groups.amax(-1) - low.float()) / 15).half()
    d = torch.where(d > 0, d, torch.ones_like(d))  # a constant group: any step
    q = torch.round((groups - low.float().unsqueeze(-1)) / d.float().unsqueeze(-1)).clamp(0, 15)
    return Q4Rows(q.to(torch.uint8).view(out_features, in_features), d, low)


def can_pack(weight: torch.Tensor) -> bool:
    """Whether `pack` may replace this projection weight: bfloat16 on a CPU the kernel runs on,
    outputs a multiple of 16, inputs of 32."""
    return (_quant is not None and weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and weight.dim() == 2 and weight.shape[0] % BLOCK == 0 and weight.shape[1] % GROUP == 0
            and _quant.supported())


def pack(rows: QuantRows, amx: bool | None = None) -> QuantWeight:
    """In the kernel's order for its AMX path, or for VNNI (by default the path this process takes,
    `quant_amx`): per block of 16 outputs and pair of groups of 32 inputs, d [2][16] (and for 4 bits
    m [2][16]) fp16, then the pair's values. For AMX per output: 4 bits as 32 bytes, byte i holding
    input i of the first group in its low nibble and of the second in its high; 8 bits as 64 bytes,
    the first group's then the second's. For VNNI as vpdpbusd takes them: per group [8][16 outputs]
    [4 inputs] bytes, 4 bits with the pair's groups in the low and high nibbles of the same bytes,
    8 bits as q + 128 (unsigned), the first group's 512 bytes then the second's. An odd last group
    pairs with an empty one."""
    amx = quant_amx() if amx is None else amx
    out_features, in_features = rows.q.shape
    blocks, groups = out_features // BLOCK, in_features // GROUP
    pairs = (groups + 1) // 2
    q = F.pad(rows.q, (0, (2 * pairs - groups) * GROUP)).view(blocks, BLOCK, pairs, 2, GROUP)
    if isinstance(rows, Q4Rows):  # q[block, output, pair, half, input] -> [block, pair, output, input]
        values = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).transpose(1, 2)
        if not amx:  # -> [block, pair, input / 4, output, input % 4]
            values = values.reshape(blocks, pairs, BLOCK, 8, 4).transpose(2, 3)
        scales = [rows.d, rows.m]
    else:
        values = q.view(torch.uint8)
        if amx:  # -> [block, pair, output, half, input]
            values = values.transpose(1, 2)
        else:  # -> [block, pair, half, input / 4, output, input % 4]
            values = (values ^ 128).view(blocks, BLOCK, pairs, 2, 8, 4).permute(0, 2, 3, 4, 1, 5)
        scales = [rows.d]

    def per_block(scale: torch.Tensor) -> torch.Tensor:  # [out, groups] fp16 -> [blocks, pairs, 64] bytes
        scale = F.pad(scale, (0, 2 * pairs - groups)).view(blocks, BLOCK, pairs, 2)
        return scale.permute(0, 2, 3, 1).contiguous().view(torch.uint8).view(blocks, pairs, 4 * BLOCK)

    parts = [per_block(scale) for scale in scales] + [values.reshape(blocks, pairs, -1)]
    return QuantWeight(torch.cat(parts, dim=-1).contiguous(), in_features, 4 if isinstance(rows, Q4Rows) else 8, amx)


def unpack(weight: QuantWeight) -> QuantRows:
    """The rows `pack` packed, from either layout."""
    blocks, pairs, _ = weight.data.shape
    out_features, groups = weight.out_features, weight.in_features // GROUP
    data = weight.data

    def scale(i: int) -> torch.Tensor:  # per_block's inverse: [blocks, pairs, half, output] -> [out, groups]
        half = data[:, :, 64 * i : 64 * (i + 1)].contiguous().view(torch.float16).view(blocks, pairs, 2, BLOCK)
        return half.permute(0, 3, 1, 2).reshape(out_features, 2 * pairs)[:, :groups].contiguous()

    def as_rows(q: torch.Tensor) -> torch.Tensor:  # [out, pairs, half, input] -> [out, in]
        return q.reshape(out_features, 2 * pairs * GROUP)[:, : weight.in_features].contiguous()

    if weight.bits == 4:
        values = data[:, :, 128:].reshape(blocks, pairs, -1)
        if weight.amx:  # [block, pair, output, input]
            values = values.view(blocks, pairs, BLOCK, GROUP).permute(0, 2, 1, 3)
        else:  # [block, pair, input / 4, output, input % 4]
            values = values.view(blocks, pairs, 8, BLOCK, 4).permute(0, 3, 1, 2, 4)
        values = values.reshape(out_features, pairs, 1, GROUP)
        return Q4Rows(as_rows(torch.cat([values & 15, values >> 4], dim=2)), scale(0), scale(1))
    values = data[:, :, 64:].reshape(blocks, pairs, -1)
    if weight.amx:  # [block, pair, output, half, input]
        values = values.view(blocks, pairs, BLOCK, 2, GROUP).permute(0, 2, 1, 3, 4)
    else:  # [block, pair, half, input / 4, output, input % 4]
        values = (values ^ 128).view(blocks, pairs, 2, 8, BLOCK, 4).permute(0, 4, 1, 2, 3, 5)
    return Q8Rows(as_rows(values).view(torch.int8), scale(0))


def dequantize_packed(weight: QuantWeight) -> torch.Tensor:
    """bf16 [out, in]: the weights as the kernel multiplies them on AMX tiles (on VNNI it takes d q (+ m)
    in fp32, before this rounding)."""
    if not weight.amx:
        return unpack(weight).dequantize().bfloat16()
    out = torch.empty(weight.shape, dtype=torch.bfloat16)
    _quant.dequantize(*weight.shape, weight.data.data_ptr(), out.data_ptr(), weight.bits)
    return out


def quant_amx() -> bool:
    """Whether the quantized kernel runs on AMX tiles: where the CPU has them, unless oneDNN is kept
    off them too (ONEDNN_MAX_CPU_ISA below AMX: AMD's path on an Intel machine, as in attention.use_amx)."""
    global _quant_amx
    if _quant_amx is None:
        _quant_amx = bool(_quant is not None and _quant.amx() and isa_allows_amx())
    return _quant_amx


_quant_amx: bool | None = None


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


def linear(x: torch.Tensor, weight: torch.Tensor | QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, in] @ weight^T (+ bias) -> [N, out]; `weight` plain, from `prepack` or `pack`."""
    if isinstance(weight, QuantWeight):
        return _linear_quant(x, weight, bias)
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


def projection_kernel(weight: torch.Tensor | QuantWeight) -> str:
    """What runs the CPU projections of which `weight` is one, for the start-up log."""
    if isinstance(weight, QuantWeight):
        where = "AMX tiles" if quant_amx() else "AVX512-VNNI, 8-bit activations"
        return f"the {weight.bits}-bit kernel on {where}"
    dtype = weight.dtype
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


def _linear_quant(x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
    out_features = weight.out_features
    if not (x.dtype == torch.bfloat16 and x.dim() == 2 and x.shape[1] == weight.in_features and x.stride(1) == 1
            and (bias is None or (bias.dtype == torch.bfloat16 and bias.is_contiguous() and bias.shape == (out_features,)))):
        raise ValueError("quantized linear: unexpected input layout")
    rows = x.shape[0]
    y = torch.empty(rows, out_features, dtype=torch.bfloat16)
    if rows:
        _quant.linear(torch.get_num_threads(), rows, out_features, weight.in_features, x.data_ptr(), x.stride(0),
                      weight.ptr, 0 if bias is None else bias.data_ptr(), y.data_ptr(), out_features,
                      weight.amx, weight.bits)
    return y


def _amx_in_use() -> bool:
    """Whether oneDNN may run bf16 on AMX tiles here: the CPU has them and ONEDNN_MAX_CPU_ISA allows them."""
    return _onednn_bf16() and torch.cpu._is_amx_tile_supported() and isa_allows_amx()


def isa_allows_amx() -> bool:
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return isa in ("ALL", "DEFAULT") or "AMX" in isa


def _onednn_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
