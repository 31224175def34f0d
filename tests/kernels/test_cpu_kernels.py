"""The numba CPU kernels (``megatron_sl.kernels.cpu_kernels``) against float64 references.

Every case of ``sl_kernel_cases.OP_CASES`` (odd shapes, empty rows, one row, no support) plus token
counts around the kernels' token tile (1, TILE-1, TILE+1, 2·TILE+3), for the SpMM with S and with Sᵀ
and for the SDDMM: float32 and float64 natively, bf16 upcast, int32 and int64 indices, an output
that is a strided view. Through the custom ops as the SL linear calls them, the same as the torch
reference (``backend="torch"``), and the whole factored SL linear (outputs and all gradients) on the
numba kernels against a float64 dense reference. Bad indices raise instead of writing out of bounds.
"""

import pytest
import torch

import sl_kernel_cases as C
from megatron_sl.core import functional as core_fn
from megatron_sl.kernels import cpu_kernels, use_backend

TILE = cpu_kernels.TOKEN_TILE
TOKENS = (1, TILE - 1, TILE + 1, 2 * TILE + 3)


def spmm_f64(dense, idx, values, m, n, transpose):
    S = torch.zeros(m * n, dtype=torch.float64)
    S[idx.long()] = values.double()
    S = S.reshape(m, n)
    return dense.double() @ (S if transpose else S.t())


def _inputs(case, tokens, dtype, idx_dtype, seed=0):
    out_f, in_f, r, _, kind, density = case
    g = torch.Generator().manual_seed(seed + 5)
    idx = C.make_support(out_f, in_f, kind, density, seed).to(idx_dtype)
    mk = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    return idx, mk(idx.numel()), mk(tokens, in_f), mk(tokens, out_f), out_f, in_f


@pytest.mark.parametrize("case", sorted(C.OP_CASES))
@pytest.mark.parametrize("tokens", TOKENS)
def test_kernels_match_float64(case, tokens):
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        for idx_dtype in (torch.int32, torch.int64):
            idx, v, x, dy, m, n = _inputs(C.OP_CASES[case], tokens, dtype, idx_dtype)
            y0 = torch.randn(tokens, m, dtype=dtype)
            y = y0.clone()
            cpu_kernels.spmm_accumulate(y, x, idx, v, False)
            assert C.rel_err(y - y0, spmm_f64(x, idx, v, m, n, False)) <= tol
            dx0 = torch.randn(tokens, n, dtype=dtype)
            dx = dx0.clone()
            cpu_kernels.spmm_accumulate(dx, dy, idx, v, True)
            assert C.rel_err(dx - dx0, spmm_f64(dy, idx, v, m, n, True)) <= tol
            g = cpu_kernels.sddmm(dy, x, idx)
            assert g.dtype == dtype and g.shape == (idx.numel(),)
            assert C.rel_err(g, C.sddmm_f64(dy, x, idx)) <= tol


def test_half_types_strided_output_and_custom_ops_match_the_reference():
    idx, v, x, dy, m, n = _inputs(C.OP_CASES["ragged-dense-ish"], TILE + 7, torch.float32, torch.int64)
    # bf16 inputs are upcast (like the reference); the result is rounded once
    got = cpu_kernels.sddmm(dy.bfloat16(), x.bfloat16(), idx)
    assert got.dtype == torch.bfloat16
    assert C.rel_err(got, C.sddmm_f64(dy.bfloat16(), x.bfloat16(), idx)) <= C.TOL[torch.bfloat16]["op"]
    # an output that is a column slice of a wider buffer (not contiguous) is written in place
    buf = torch.zeros(x.shape[0], m + 3)
    cpu_kernels.spmm_accumulate(buf[:, 1:m + 1], x, idx, v, False)
    assert C.rel_err(buf[:, 1:m + 1], spmm_f64(x, idx, v, m, n, False)) <= 1e-5
    assert not buf[:, 0].any() and not buf[:, m + 1:].any()
    # the custom ops, as the SL Functions call them: numba (auto on one thread) == torch reference
    outs = {}
    for backend in ("numba", "torch"):
        with use_backend(backend):
            y, dx = torch.zeros(x.shape[0], m), torch.zeros(x.shape[0], n)
            torch.ops.megatron_sl.spmm_accumulate(y, x, idx, v, False)
            torch.ops.megatron_sl.spmm_accumulate(dx, dy, idx, v, True)
            outs[backend] = (y, dx, torch.ops.megatron_sl.sddmm(dy, x, idx))
    for a, b in zip(outs["numba"], outs["torch"]):
        assert C.rel_err(a, b) <= 1e-5


def test_factored_linear_on_numba_matches_float64_dense():
    """Outputs and every gradient of the factored SL linear, sparse products on the numba kernels."""
    case = (97, 70, 6, (3, TILE - 5), "random", 0.1)
    params, x, gy, layout = C.linear_inputs(case, torch.float32, "cpu")
    with use_backend("numba"):
        y, grads = C.linear_grads(
            lambda x, **p: core_fn.sl_linear(x, p["B"], p["A"], p["values"], layout, 0.5, p["bias"],
                                             path="factored"), params, x, gy)
    y_ref, g_ref = C.linear_grads(
        lambda x, **p: C.reference_linear_f64(x, p["B"], p["A"], p["values"], p["bias"], layout.idx, 0.5),
        {k: t.double() for k, t in params.items()}, x.double(), gy.double())
    assert C.rel_err(y, y_ref) <= C.TOL[torch.float32]["linear"]
    assert set(grads) == {"x", "B", "A", "values", "bias"}
    for k in grads:
        assert C.rel_err(grads[k], g_ref[k]) <= C.TOL[torch.float32]["linear"], k


def test_out_of_range_index_raises_instead_of_writing():
    x, v = torch.randn(5, 4), torch.ones(1)
    for bad in (torch.tensor([12]), torch.tensor([-1])):  # the matrix is 3 x 4: positions 0..11
        y = torch.zeros(5, 3)
        with pytest.raises(IndexError, match="outside the weight matrix"):
            cpu_kernels.spmm_accumulate(y, x, bad, v, False)
        with pytest.raises(IndexError, match="outside the weight matrix"):
            cpu_kernels.sddmm(y, x, bad)
        assert not y.any()
