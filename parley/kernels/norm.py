"""The residual add and RMSNorm of a decoder layer, in one call of _norm.c for bfloat16 on CPUs with
AVX512-BF16, else in torch (float32 keeps torch's ops: the transformers comparisons run there)."""

from __future__ import annotations

import torch  # before _norm, as for the other kernels
import torch.nn.functional as F

try:
    from parley.kernels import _norm
except ImportError:  # not built here (see setup.py)
    _norm = None

_supported = _norm is not None and _norm.supported()


def rms_norm(delta: torch.Tensor, hidden: torch.Tensor | None, weight: torch.Tensor,
             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(total) * weight, total) for total = hidden + delta, or delta where hidden is None;
    rows [N, width]."""
    if (_supported and delta.dtype == weight.dtype == torch.bfloat16 and delta.device.type == "cpu"
            and delta.dim() == 2 and delta.is_contiguous() and weight.is_contiguous() and delta.shape[-1] % 16 == 0
            and (hidden is None or (hidden.is_contiguous() and hidden.shape == delta.shape and hidden.dtype == delta.dtype))):
        rows, width = delta.shape
        out = torch.empty(rows, width, dtype=torch.bfloat16)
        total = delta if hidden is None else torch.empty(rows, width, dtype=torch.bfloat16)
        _norm.rms_norm(rows, width, delta.data_ptr(), 0 if hidden is None else hidden.data_ptr(),
                       total.data_ptr(), out.data_ptr(), weight.data_ptr(), eps)
        return out, total
    total = delta if hidden is None else hidden + delta
    return F.rms_norm(total, total.shape[-1:], weight, eps), total
