"""Numerics of the Triton kernels on CPU tensors, in the Triton interpreter.

Needs ``TRITON_INTERPRET=1`` before triton is imported, so it is not collected by a plain
``pytest tests/`` (the file name does not match ``test_*.py``): ``test_kernels_cpu.py::
test_interpreter_suite`` runs it in a separate pytest process with the variable set. To run it by
hand: ``TRITON_INTERPRET=1 .venv/bin/pytest tests/kernels/interp_cases.py -q``.

Sections:
1. the interpreter is really in use (kernels are interpreted, bf16 upcast on, CPU -> Triton);
2. ``densify`` and ``sddmm`` vs the float64 reference, fp32 and bf16, odd shapes, density 0, 3 nnz,
   rows without entries, nnz not a multiple of the block, small (many tiles, ragged edges,
   several sparse chunks per tile) and large blocks, non-contiguous operands;
3. the whole SL linear, forward and backward (x, B, A, values, bias), with the Triton primitives
   installed, both execution paths, vs float64 autograd; kernel launches are counted, so a
   silent fallback to the torch reference fails;
4. ``torch.library.opcheck`` of both ops with the Triton implementation;
5. no tile layout outlives a launch; a caller may pass its own.

If ``SL_NUMERICS_JSON`` is set, the worst errors per kernel and dtype (Triton and, for comparison,
the torch reference in the same dtype) are written there.
"""

import json
import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported; run via "
                "tests/kernels/test_kernels_cpu.py::test_interpreter_suite", allow_module_level=True)

import torch  # noqa: E402

import megatron_sl.kernels as K  # noqa: E402
import sl_kernel_cases as C  # noqa: E402
from megatron_sl.kernels import settings  # noqa: E402
from megatron_sl.kernels import triton_kernels as tk  # noqa: E402

# Small non-square blocks: many tiles, ragged edges, several sparse chunks per tile. Interpreter
# cost grows with programs x loop trips, so the large case runs with the default (large) blocks.
SMALL = (K.DensifyBlocks(block_m=32, block_n=16, block_r=16, block_s=32, num_warps=4, num_stages=1),
         K.SddmmBlocks(block_m=16, block_n=32, block_t=16, block_s=32, num_warps=4, num_stages=1))
BLOCKS = {"small": SMALL, "interp-default": (None, None)}
OP_COMBOS = [(case, blocks) for case in C.OP_CASES for blocks in BLOCKS
             if not (case == "ragged-dense-ish" and blocks == "small")]
SCALE = 0.75
ERRORS: dict = {}


def _record(kernel: str, dt: str, impl: str, err: float) -> None:
    row = ERRORS.setdefault(f"{kernel}|{dt}", {"kernel": kernel, "dtype": dt})
    row[impl] = max(row.get(impl, 0.0), err)


@pytest.fixture(scope="module", autouse=True)
def _dump_numerics():
    yield
    path = os.environ.get("SL_NUMERICS_JSON")
    if path:
        with open(path, "w") as f:
            json.dump(list(ERRORS.values()), f, indent=1)


@pytest.fixture(autouse=True)
def _force_triton():
    with K.use_backend("triton"):
        yield


@pytest.fixture
def launches(monkeypatch):
    return C.count_launches(monkeypatch)


# 1 ---------------------------------------------------------------------------------------------

def test_interpreter_in_use():
    assert tk.INTERPRETED and tk.UPCAST
    assert settings.interpreter_active()
    assert settings.resolve_backend("cpu") == "triton"
    assert K.select("densify", "cpu") is K.triton_densify  # forced Triton reaches core's ops
    with K.use_backend(None):
        assert settings.resolve_backend("cpu") in ("numba", "torch", "triton")  # env decides; auto -> numba


# 2 ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case,blocks", OP_COMBOS)
@pytest.mark.parametrize("dt", list(C.DTYPES))
def test_densify(dt, case, blocks, launches):
    dtype = C.DTYPES[dt]
    B, A, v, idx, _, _ = C.op_inputs(C.OP_CASES[case], dtype, "cpu")
    strided = case == "odd-random"
    with K.use_blocks(*BLOCKS[blocks]):
        W = K.densify(B, A, v, idx, SCALE)
        if strided:  # column-major A, B
            assert torch.equal(W, K.densify(B.t().contiguous().t(), A.t().contiguous().t(), v, idx, SCALE))
    assert launches["densify"] == 1 + strided
    assert W.shape == (B.shape[0], A.shape[1]) and W.dtype == dtype
    ref = C.densify_f64(B, A, v, idx, SCALE)
    err = C.rel_err(W, ref)
    _record("densify", dt, "triton", err)
    _record("densify", dt, "torch", C.rel_err(K.densify(B, A, v, idx, SCALE, backend="torch"), ref))
    assert err <= C.TOL[dtype]["op"], f"densify {dt} {case}: rel err {err:.2e}"


@pytest.mark.parametrize("case,blocks", OP_COMBOS)
@pytest.mark.parametrize("dt", list(C.DTYPES))
def test_sddmm(dt, case, blocks, launches):
    dtype = C.DTYPES[dt]
    _, _, _, idx, dy, x = C.op_inputs(C.OP_CASES[case], dtype, "cpu")
    strided = case == "odd-random"
    with K.use_blocks(*BLOCKS[blocks]):
        g = K.sddmm(dy, x, idx)
        if strided:  # column-major dY and X
            assert torch.equal(g, K.sddmm(dy.t().contiguous().t(), x.t().contiguous().t(), idx))
    assert launches["sddmm"] == ((1 + strided) if idx.numel() else 0)  # nnz == 0 returns before any launch
    assert g.shape == (idx.numel(),) and g.dtype == dtype
    ref = C.sddmm_f64(dy, x, idx)
    err = C.rel_err(g, ref)
    _record("sddmm", dt, "triton", err)
    _record("sddmm", dt, "torch", C.rel_err(K.sddmm(dy, x, idx, backend="torch"), ref))
    assert err <= C.TOL[dtype]["op"], f"sddmm {dt} {case}: rel err {err:.2e}"


def test_sddmm_zero_tokens():
    _, _, _, idx, dy, x = C.op_inputs(C.OP_CASES["odd-random"], torch.float32, "cpu")
    g = K.sddmm(dy[:0], x[:0], idx)
    assert torch.equal(g, torch.zeros_like(g))


# 3 ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["dense", "factored"])
@pytest.mark.parametrize("case", list(C.LINEAR_CASES))
@pytest.mark.parametrize("dt", list(C.DTYPES))
def test_sl_linear_forward_backward(dt, case, path, launches):
    dtype = C.DTYPES[dt]
    with K.use_blocks(*(SMALL if case != "empty-rows" else BLOCKS["interp-default"])):
        errs = C.check_linear(K.sl_linear, C.LINEAR_CASES[case], dtype, "cpu", path)
    nnz_case = C.LINEAR_CASES[case][5] != 0.0
    if path == "dense":
        assert launches == {"densify": 2, "sddmm": 0}  # forward W, backward W recompute
    else:
        assert launches == {"densify": 0, "sddmm": 1 if nnz_case else 0}
    with K.use_backend("torch"):
        errs_torch = C.check_linear(K.sl_linear, C.LINEAR_CASES[case], dtype, "cpu", path)
    _record(f"sl_linear[{path}]", dt, "triton", max(errs.values()))
    _record(f"sl_linear[{path}]", dt, "torch", max(errs_torch.values()))
    tol = C.TOL[dtype]["linear"]
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"{path} {dt} {case}: rel errors above {tol}: {bad}"


# 4 ---------------------------------------------------------------------------------------------

def test_opcheck_triton_implementation():
    B, A, v, idx, dy, x = C.op_inputs((20, 24, 3, 5, "random", 0.2), torch.float32, "cpu")
    B.requires_grad_(True)
    x.requires_grad_(True)
    # the registration-only checks (aot dispatch) run on the reference in test_kernels_cpu.py
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    with K.use_blocks(None, None):
        torch.library.opcheck(torch.ops.megatron_sl.densify.default, (B, A, v, idx, SCALE), {"backend": "triton"},
                              test_utils=utils)
        torch.library.opcheck(torch.ops.megatron_sl.sddmm.default, (dy, x, idx), {"backend": "triton"},
                              test_utils=utils)


# 5 ---------------------------------------------------------------------------------------------

def test_no_tile_layout_outlives_a_launch(launches):
    params, x, gy, layout = C.linear_inputs(C.LINEAR_CASES["odd-random"], torch.float32, "cpu")
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    x = x.detach().requires_grad_(True)  # backward of the dense path densifies again for dX
    total = 0
    with K.use_blocks(*SMALL):
        for path in ("dense", "factored"):
            before = launches["densify"] + launches["sddmm"]
            with C.IntTensorTracker() as created:
                y = K.sl_linear(x, layout=layout, scale=SCALE, path=path, **params)
                y.backward(gy)
            total += launches["densify"] + launches["sddmm"] - before
            assert created.alive_bytes() == 0, (path, created.alive())  # each launch dropped its tile layout
    assert total >= 3  # densify in forward and backward (dense path), sddmm (factored path)
    assert K.index_report(layout, "cpu")["per_nnz"]["total"] == 4.0


def test_tile_layout_passed_by_the_caller():
    """A launch uses the tile layout its caller owns (same result as building one per launch) and
    refuses one made for other blocks."""
    B, A, v, idx, dy, x = C.op_inputs(C.OP_CASES["odd-random"], torch.float32, "cpu")
    db, sb = SMALL
    own_d = K.build_tile_layout(idx, B.shape[0], A.shape[1], db.block_m, db.block_n)
    own_s = K.build_tile_layout(idx, dy.shape[1], x.shape[1], sb.block_m, sb.block_n)
    assert torch.equal(tk.densify(B, A, v, idx, SCALE, db, tiles=own_d), tk.densify(B, A, v, idx, SCALE, db))
    assert torch.equal(tk.sddmm(dy, x, idx, sb, tiles=own_s), tk.sddmm(dy, x, idx, sb))
    with pytest.raises(ValueError, match="does not match the launch"):
        tk.densify(B, A, v, idx, SCALE, db, tiles=own_s)

