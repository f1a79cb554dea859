"""The projection op of every layer and adapter: prepacked on CPU in bfloat16, and batch-invariant."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from parley.adapters.ops import lora_linear
from parley.kernels.linear import AMX_ROWS, _onednn_bf16, linear, linear_then, prepack, projection_kernel, rows_per_call


def _weight_and_rows(in_features=1536, out_features=576, rows=64):
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(out_features, in_features, generator=generator) / 30).bfloat16()
    return weight, torch.randn(rows, in_features, generator=generator).bfloat16()


NO_BF16 = "no AVX-512 on this CPU: torch runs bf16 on reference kernels, whose row invariance we do not promise"
bf16_kernels = pytest.mark.skipif(not _onednn_bf16(), reason=NO_BF16)


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as info:
        return next((set(line.split(":")[1].split()) for line in info if line.startswith("flags")), set())


# Runs a packed bf16 projection in a fresh process with oneDNN's verbose log on and prints the log:
# its exec lines name the kernel that ran, ISA included ("brg_matmul:avx512_core_bf16").
PROBE = """
import parley, torch
from parley.kernels.linear import linear, prepack
weight = prepack(torch.randn(64, 64).bfloat16())
with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
    linear(torch.randn(4, 64).bfloat16(), weight)
"""


def _onednn_kernels(isa: str | None) -> set[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300,
                         check=True).stdout
    return {line.split(",")[6] for line in out.splitlines() if line.startswith("onednn_verbose,v1,primitive,exec")}


@bf16_kernels
@pytest.mark.skipif("avx512_bf16" not in _cpu_flags(), reason="this CPU has no AVX512-BF16 kernels to check for")
def test_bf16_projections_run_on_the_fastest_kernels_and_say_so():
    # AMX tiles where the CPU has them (run 32 rows per call, see rows_per_call), AVX512-BF16 elsewhere
    kernels = _onednn_kernels(None)
    amx = "amx_bf16" in _cpu_flags()
    assert len(kernels) == 1 and ("amx" in next(iter(kernels))) == amx, kernels
    assert ("AMX" in projection_kernel(prepack(torch.randn(64, 64).bfloat16()))) == (amx and rows_per_call() == AMX_ROWS)


@bf16_kernels
def test_a_users_onednn_isa_is_kept():
    if "avx512_bf16" in _cpu_flags():
        assert _onednn_kernels("AVX512_CORE_BF16") == {"brg_matmul:avx512_core_bf16"}
    assert not any("bf16" in kernel for kernel in _onednn_kernels("AVX512_CORE"))


@bf16_kernels
@pytest.mark.parametrize("in_features, out_features", [(576, 960), (576, 3072), (1536, 576), (576, 49152)])
def test_a_rows_projection_does_not_depend_on_the_rows_beside_it(in_features, out_features):
    # The default model's fused qkv, gate_up, down and lm_head, at the rows of decode batches and prompt chunks.
    generator = torch.Generator().manual_seed(1)
    weight = prepack((torch.randn(out_features, in_features, generator=generator) / 30).bfloat16())
    x = torch.randn(600, in_features, generator=generator).bfloat16()
    alone = torch.cat([linear(x[r : r + 1], weight) for r in range(0, 600, 7)])
    for rows in (2, 3, 8, 15, 16, 17, 32, 33, 64, 127, 128, 129, 200, 256, 600):
        for start in {0, 600 - rows}:
            batch = linear(x[start : start + rows], weight)
            at = [r for r in range(start, start + rows) if r % 7 == 0]
            assert torch.equal(batch[[r - start for r in at]], alone[[r // 7 for r in at]]), (rows, start)


@bf16_kernels
def test_a_row_alone_equals_the_same_row_in_a_batch_in_bfloat16():
    # One row takes oneDNN's gemv path, which sums a long inner dimension in another order than
    # gemm: F.linear rounds a few of these rows differently alone than in the batch.
    weight, x = _weight_and_rows(rows=32)  # F.linear keeps a row's bits up to 32 rows on AMX too
    batched = F.linear(x, weight)
    if rows_per_call() != AMX_ROWS:  # AVX-512's gemv; AMX tiles sum one row as they sum 32
        assert any(not torch.equal(F.linear(x[r : r + 1], weight)[0], batched[r]) for r in range(32))
    packed = prepack(weight)
    for r in range(32):
        assert torch.equal(linear(x[r : r + 1], weight)[0], batched[r])
        assert torch.equal(linear(x[r : r + 1], packed)[0], batched[r])
        assert torch.equal(lora_linear(x[r : r + 1], packed, None, None)[0], batched[r])


@bf16_kernels
def test_prepacked_bfloat16_weights_give_the_same_numbers_as_f_linear():
    weight, x = _weight_and_rows(576, 960, 32)
    bias = torch.randn(960).bfloat16()
    packed = prepack(weight)
    assert packed.is_mkldnn
    assert torch.equal(linear(x, packed, bias), F.linear(x, weight, bias))


def test_float32_weights_are_packed_and_rows_keep_their_bits():
    # F.linear runs MKL's sgemm in float32, which rounds a row differently at 8 rows than at 2
    generator = torch.Generator().manual_seed(2)
    weight, x, bias = torch.randn(96, 64, generator=generator), torch.randn(40, 64, generator=generator), torch.randn(96)
    packed = prepack(weight)
    assert packed.is_mkldnn
    batched = linear(x, packed, bias)
    torch.testing.assert_close(batched, F.linear(x, weight, bias))
    for rows in (1, 2, 3, 8, 17):
        assert torch.equal(linear(x[:rows], packed, bias), batched[:rows])


def test_linear_then_fuses_add_and_a_mask_on_plain_and_packed_weights():
    weight, x = _weight_and_rows(576, 96, 8)
    other = torch.randn(8, 96).bfloat16()
    mask = (torch.rand(8, 96) > 0.5).bfloat16()  # what LoRA multiplies by: 0 or 1, exact either way
    for w in (weight, prepack(weight)):
        assert torch.equal(linear_then(x, w, "add", other), torch.addmm(other, x, weight.t()))
        assert torch.equal(linear_then(x, w, "mul", mask), F.linear(x, weight) * mask)
    x32, w32, other32 = x.float(), weight.float(), other.float()
    for w in (w32, prepack(w32)):
        assert torch.allclose(linear_then(x32, w, "add", other32), other32 + x32 @ w32.t(), atol=1e-5)
        assert torch.allclose(linear_then(x32, w, "mul", mask.float()), (x32 @ w32.t()) * mask.float(), atol=1e-5)


def test_a_models_shapes_that_round_with_the_batch_lower_the_rows_per_call(monkeypatch, caplog):
    # Where rows are split (AMX), the limit is checked on every shape of the loaded model: here a
    # stand-in kernel that rounds with the number of rows beyond 32, one that always does, one that never does.
    from parley.kernels import linear as module

    weight = torch.randn(8, 64)
    monkeypatch.setattr(module, "_rows_per_call", AMX_ROWS)
    monkeypatch.setattr(module, "_projection", lambda x, w: x * 2 + (x.shape[0] > 32))
    module.check_rows_per_call([weight])
    assert rows_per_call() == 32 and "calls of 32 rows" in caplog.text
    module.check_rows_per_call([weight])  # 32 now: checked again at 32, which holds
    assert rows_per_call() == 32

    monkeypatch.setattr(module, "_rows_per_call", AMX_ROWS)
    monkeypatch.setattr(module, "_projection", lambda x, w: x * 2 + (x.shape[0] > 2))
    module.check_rows_per_call([weight])
    assert rows_per_call() == 32 and "may depend on the batch" in caplog.text

    monkeypatch.setattr(module, "_rows_per_call", AMX_ROWS)
    monkeypatch.setattr(module, "_projection", lambda x, w: x * 2)  # row by row
    module.check_rows_per_call([weight])
    assert rows_per_call() == AMX_ROWS
