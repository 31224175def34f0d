"""GPU tests of the Triton kernels against the reference, on a CUDA device.

Skipped without CUDA. The checks are those of the interpreter suite (``interp_cases.py``, same
cases and tolerance table from ``sl_kernel_cases.py``) plus what only real hardware can show:
the GPU block sizes, the CTA barrier of the fused densify under load, TF32 dots, and the
preset layer shapes. fp32 runs with IEEE dots and TF32 off in torch (exact fp32 both sides);
one test turns TF32 on and uses TF32-aware tolerances.

``SL_KERNEL_TEST_DEVICE=cpu`` together with ``TRITON_INTERPRET=1`` runs this file on CPU tensors
in the interpreter (slow; for checking the tests themselves on a machine without a GPU).
"""

import os

import pytest
import torch

import megatron_sl.kernels as K
import sl_kernel_cases as C
from megatron_sl.kernels import settings

DEVICE = os.environ.get("SL_KERNEL_TEST_DEVICE", "cuda")
if DEVICE == "cuda":
    _reason = "needs a CUDA device (torch.cuda.is_available() is False); the CPU interpreter suite covers numerics"
    _skip = not torch.cuda.is_available()
else:
    _reason = f"SL_KERNEL_TEST_DEVICE={DEVICE} needs TRITON_INTERPRET=1"
    _skip = os.environ.get("TRITON_INTERPRET") != "1"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_skip, reason=_reason)]

SMALL = (K.DensifyBlocks(block_m=32, block_n=16, block_r=16, block_s=32, num_warps=4, num_stages=2),
         K.SddmmBlocks(block_m=16, block_n=32, block_t=16, block_s=32, num_warps=4, num_stages=2))
BLOCKS = {"gpu-default": (settings.GPU_DENSIFY, settings.GPU_SDDMM), "small": SMALL}


@pytest.fixture(autouse=True)
def _setup():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    with K.use_backend("triton" if DEVICE != "cuda" else None):  # on CUDA, "auto" must pick Triton
        yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture
def launches(monkeypatch):
    return C.count_launches(monkeypatch)


def test_auto_backend_is_triton_on_cuda():
    assert settings.resolve_backend(torch.device(DEVICE).type) == "triton"


@pytest.mark.parametrize("blocks", list(BLOCKS))
@pytest.mark.parametrize("case", list(C.OP_CASES))
@pytest.mark.parametrize("dt", list(C.DTYPES))
def test_densify_and_sddmm(dt, case, blocks, launches):
    dtype = C.DTYPES[dt]
    B, A, v, idx, dy, x = C.op_inputs(C.OP_CASES[case], dtype, DEVICE)
    with K.use_blocks(*BLOCKS[blocks]):
        W = K.densify(B, A, v, idx, 0.75)
        g = K.sddmm(dy, x, idx)
        g_strided = K.sddmm(dy.t().contiguous().t(), x.t().contiguous().t(), idx)
    assert launches["densify"] == 1 and launches["sddmm"] == (2 if idx.numel() else 0)
    assert W.device.type == DEVICE and W.dtype == dtype and g.dtype == dtype
    assert C.rel_err(W, C.densify_f64(B, A, v, idx, 0.75)) <= C.TOL[dtype]["op"]
    assert C.rel_err(g, C.sddmm_f64(dy, x, idx)) <= C.TOL[dtype]["op"]
    assert torch.equal(g, g_strided)


@pytest.mark.parametrize("path", ["dense", "factored"])
@pytest.mark.parametrize("case", list(C.LINEAR_CASES))
@pytest.mark.parametrize("dt", list(C.DTYPES))
def test_sl_linear_forward_backward(dt, case, path, launches):
    dtype = C.DTYPES[dt]
    errs = C.check_linear(K.sl_linear, C.LINEAR_CASES[case], dtype, DEVICE, path)
    if path == "dense":
        assert launches["densify"] == 2
    elif C.LINEAR_CASES[case][5] != 0.0:
        assert launches["sddmm"] == 1
    tol = C.TOL[dtype]["linear"]
    assert all(e <= tol for e in errs.values()), errs


def test_fused_densify_barrier_is_exact_under_load():
    """W = lowrank + S must equal the same kernel's low-rank-only tile plus a separate scatter,
    bit for bit: a missing/ineffective barrier would let the dense store overwrite the RMW."""
    out_f, in_f, r = 1024, 768, 64
    g = torch.Generator().manual_seed(3)
    idx = torch.randperm(out_f * in_f, generator=g)[: out_f * in_f // 3].sort().values.to(DEVICE)
    B = torch.randn(out_f, r, generator=g).to(DEVICE)
    A = torch.randn(r, in_f, generator=g).to(DEVICE)
    v = torch.randn(idx.numel(), generator=g).to(DEVICE)
    empty = idx[:0]
    expected = K.densify(B, A, v[:0], empty, 0.5).view(-1).index_add_(0, idx, v).view(out_f, in_f)
    for _ in range(10):
        assert torch.equal(K.densify(B, A, v, idx, 0.5), expected)


def test_tf32_dots_with_tf32_tolerance():
    torch.backends.cuda.matmul.allow_tf32 = True
    B, A, v, idx, dy, x = C.op_inputs(C.OP_CASES["ragged-dense-ish"], torch.float32, DEVICE)
    from megatron_sl.kernels import triton_kernels as tk
    assert tk.input_precision(torch.float32) == "tf32"
    # TF32 keeps 10 mantissa bits: unit roundoff 2^-11 ~ 5e-4 per operand
    assert C.rel_err(K.densify(B, A, v, idx, 0.75), C.densify_f64(B, A, v, idx, 0.75)) <= 5e-3
    assert C.rel_err(K.sddmm(dy, x, idx), C.sddmm_f64(dy, x, idx)) <= 5e-3


@pytest.mark.parametrize("path", ["dense", "factored"])
@pytest.mark.parametrize("shape", [(512, 1376, 128), (768, 2048, 256)])
def test_preset_shapes_bf16(shape, path):
    in_f, out_f, r = shape
    case = (out_f, in_f, r, (512,), "random", 0.03)
    errs = C.check_linear(K.sl_linear, case, torch.bfloat16, DEVICE, path)
    assert all(e <= C.TOL[torch.bfloat16]["linear"] for e in errs.values()), errs
