"""A gated MLP's activation, silu(gate) * up, in one call of _activation.c for bfloat16 on CPUs
with AVX512-BF16, else in torch (float32 keeps torch's ops: the transformers comparisons run there;
other activations, GELU's, stay in torch too)."""

from __future__ import annotations

import torch  # before _activation, as for the other kernels
import torch.nn.functional as F

try:
    from parley.kernels import _activation
except ImportError:  # not built here (see setup.py)
    _activation = None

_supported = _activation is not None and _activation.supported()


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [N, 2 * I] (gate, then up) -> silu(gate) * up [N, I]."""
    rows, width = gate_up.shape
    if _supported and gate_up.dtype == torch.bfloat16 and gate_up.device.type == "cpu" and gate_up.stride(1) == 1:
        out = torch.empty(rows, width // 2, dtype=gate_up.dtype)
        _activation.silu_mul(torch.get_num_threads(), rows, width // 2, gate_up.data_ptr(), gate_up.stride(0),
                             out.data_ptr())
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
