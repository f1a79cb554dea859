"""The draw of sampled rows (temperature, top_k, top_p, min_p, one uniform each) in one call of
_sample.c on CPUs with AVX512-BF16 (`available`); parley/sampling/sampler.py keeps its torch path
elsewhere, and for typical_p."""

from __future__ import annotations

import torch  # before _sample, as for the other kernels

try:
    from parley.kernels import _sample
except ImportError:  # not built here (see setup.py)
    _sample = None

_supported = _sample is not None and _sample.supported()


def available(device: torch.device | str) -> bool:
    return _supported and torch.device(device).type == "cpu"


def draw(x: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
         log_min_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """x [R, V] float32 logits (rows may be strided); per row float32 temperature (1: none), int64
    top_k (0: none), float32 top_p (1: none), float32 log_min_p (-inf: none), float64 u in [0, 1).
    Returns the rows' token ids, int64 [R]."""
    rows, width = x.shape
    per_row = (temperature, top_k, top_p, log_min_p, u)
    dtypes = (torch.float32, torch.int64, torch.float32, torch.float32, torch.float64)
    if not (x.dtype == torch.float32 and x.stride(1) == 1 and all(
            t.shape == (rows,) and t.dtype == d and t.is_contiguous() for t, d in zip(per_row, dtypes))):
        raise ValueError("draw: unexpected layout")
    out = torch.empty(rows, dtype=torch.int64)
    _sample.draw(torch.get_num_threads(), rows, width, x.data_ptr(), x.stride(0), *(t.data_ptr() for t in per_row),
                 out.data_ptr())
    return out
