"""CPU tests of megatron_sl.kernels (no GPU needed).

Sections:
1. dispatch: backend resolution (env var, set_backend, op argument), clear errors;
2. dispatch: core's custom ops pick Triton / the reference the same way whatever was imported;
3. the custom ops on the torch reference: opcheck, float64 gradcheck of their autograd formulas,
   torch.compile (fullgraph), bad inputs rejected before any compute;
4. tile layout: structure, once per layer, index bytes per nnz;
5. path selection: the cost model's documented choices at the preset shapes, ``auto`` follows
   it, and both paths give the same result with the kernels installed;
6. subprocess suites: the Triton numerics under TRITON_INTERPRET=1 (``interp_cases.py``) and the
   compile-only build for sm_80/sm_90 (``kernels/aot_compile.py``), each in its own process
   because the interpreter switch is fixed when triton kernels are imported.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import megatron_sl.kernels as K
import sl_kernel_cases as C
from megatron_sl.core import SLLinear, cost_model
from megatron_sl.core import functional as core_fn
from megatron_sl.kernels import ops, settings

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


# 1 ---------------------------------------------------------------------------------------------

def test_backend_resolution(monkeypatch):
    monkeypatch.delenv(settings.ENV_BACKEND, raising=False)
    with K.use_backend(None):
        assert torch.get_num_threads() == 1  # the suite runs with OMP_NUM_THREADS=1, like every CPU rank
        assert settings.resolve_backend("cpu") == "numba"
        assert settings.resolve_backend("cuda") == "triton"
        torch.set_num_threads(2)  # MKL's CSR products are threaded, the numba kernels are not
        try:
            assert settings.resolve_backend("cpu") == "torch"
        finally:
            torch.set_num_threads(1)
        with pytest.raises(RuntimeError, match="'numba' was forced for cuda tensors"):
            settings.resolve_backend("cuda", "numba")
        monkeypatch.setenv(settings.ENV_BACKEND, "torch")
        assert settings.resolve_backend("cuda") == "torch"
        with K.use_backend("triton"):  # the setting beats the env var
            assert settings.resolve_backend("cuda") == "triton"
            assert settings.resolve_backend("cuda", "torch") == "torch"  # the op argument beats both
        monkeypatch.setenv(settings.ENV_BACKEND, "cuda-please")
        with pytest.raises(ValueError, match="MEGATRON_SL_KERNELS='cuda-please'"):
            settings.resolve_backend("cpu")
    with pytest.raises(ValueError, match="backend='fast'"):
        K.set_backend("fast")


def test_forcing_triton_on_cpu_without_interpreter_fails_clearly():
    if settings.interpreter_active():
        pytest.skip("this process runs the Triton interpreter")
    B, A, v, idx, dy, x = C.op_inputs(C.OP_CASES["odd-random"], torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.densify(B, A, v, idx, 0.5, backend="triton")
    with K.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.sddmm(dy, x, idx)


def test_block_settings_are_validated():
    with pytest.raises(ValueError, match="block_m=48 must be a power of two"):
        K.set_blocks(densify=K.DensifyBlocks(block_m=48))
    with pytest.raises(ValueError, match="block_t=8 must be >= 16"):
        K.set_blocks(sddmm=K.SddmmBlocks(block_t=8))
    with K.use_blocks(sddmm=K.SddmmBlocks(block_m=32)):
        assert settings.sddmm_blocks().block_m == 32
    assert settings.sddmm_blocks() == settings.GPU_SDDMM


# 2 ---------------------------------------------------------------------------------------------

def test_dispatch_does_not_depend_on_imports():
    """core's ops find the accelerated implementations by module name when they run: importing
    only megatron_sl.core (no kernels, nothing patched) gives the same dispatch as importing the
    kernels first; CUDA tensors get Triton, CPU tensors (one torch thread) the numba kernels for the
    sparse products and the torch reference for densify."""
    code = (
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from megatron_sl.core import SLLinear, ops\n"
        "assert 'megatron_sl.kernels' not in sys.modules\n"
        "names = ('densify', 'sddmm', 'spmm_accumulate')\n"
        "first = {(n, d): ops.implementation(n, d) for n in names for d in ('cuda', 'cpu')}\n"
        "import megatron_sl.kernels as K\n"
        "from megatron_sl.kernels import ops as kops\n"
        "assert first == {(n, d): ops.implementation(n, d) for n in names for d in ('cuda', 'cpu')}\n"
        "assert first[('densify', 'cuda')] is K.triton_densify and first[('sddmm', 'cuda')] is K.triton_sddmm\n"
        "assert first[('spmm_accumulate', 'cuda')] is None and first[('densify', 'cpu')] is None\n"
        "assert first[('sddmm', 'cpu')] is kops.numba_sddmm\n"
        "assert first[('spmm_accumulate', 'cpu')] is kops.numba_spmm_accumulate\n"
        "assert 'megatron_sl.kernels.triton_kernels' not in sys.modules  # triton stays lazy\n"
        "assert 'numba' not in sys.modules  # so does numba\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k not in (settings.ENV_BACKEND, "TRITON_INTERPRET")}
    proc, log = _run([sys.executable, "-c", code], env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", log
    assert K.sl_linear is core_fn.sl_linear
    assert not hasattr(core_fn, "OPS")  # no table for an import to patch


# 3 ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_reference(dtype):
    B, A, v, idx, dy, x = C.op_inputs((20, 24, 3, 5, "random", 0.2), dtype, "cpu")
    for t in (B, A, v, dy, x):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.megatron_sl.densify.default, (B, A, v, idx, 0.5))
    torch.library.opcheck(torch.ops.megatron_sl.sddmm.default, (dy, x, idx))
    torch.library.opcheck(torch.ops.megatron_sl.sddmm.default, (dy, x, idx[:0]))


def test_op_autograd_formulas_gradcheck():
    B, A, v, idx, dy, x = C.op_inputs((9, 7, 2, 4, "random", 0.3), torch.float64, "cpu")
    for t in (B, A, v, dy, x):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda B, A, v: K.densify(B, A, v, idx, 0.7), (B, A, v))
    assert torch.autograd.gradcheck(lambda dy, x: K.sddmm(dy, x, idx), (dy, x))


def test_ops_match_float64_reference_on_cpu():
    for dt, dtype in C.DTYPES.items():
        B, A, v, idx, dy, x = C.op_inputs(C.OP_CASES["empty-rows"], dtype, "cpu")
        assert C.rel_err(K.densify(B, A, v, idx, 0.75), C.densify_f64(B, A, v, idx, 0.75)) <= C.TOL[dtype]["op"]
        assert C.rel_err(K.sddmm(dy, x, idx), C.sddmm_f64(dy, x, idx)) <= C.TOL[dtype]["op"]


def test_torch_compile_accepts_the_ops():
    B, A, v, idx, dy, x = C.op_inputs((20, 24, 3, 7, "random", 0.1), torch.float32, "cpu")
    leaves = [t.clone().requires_grad_(True) for t in (B, A, v)]

    def f(B, A, v, x, dy):
        W = torch.ops.megatron_sl.densify(B, A, v, idx, 0.5)
        g = torch.ops.megatron_sl.sddmm(dy, x, idx)
        return (x @ W.t()).square().sum() + (g * v).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(*leaves, x, dy)
    grads = torch.autograd.grad(out, leaves)
    ref_leaves = [t.clone().requires_grad_(True) for t in (B, A, v)]
    ref = f(*ref_leaves, x, dy)
    ref_grads = torch.autograd.grad(ref, ref_leaves)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_bad_inputs_raise_before_compute():
    B, A, v, idx, dy, x = C.op_inputs(C.OP_CASES["odd-random"], torch.float32, "cpu")
    with pytest.raises(ValueError, match="rank mismatch"):
        K.densify(B[:, :2], A, v, idx, 0.5)
    with pytest.raises(ValueError, match="values has 330 entries but idx has 331"):
        K.densify(B, A, v[:-1], idx, 0.5)
    with pytest.raises(ValueError, match="idx must be a 1-D int32/int64"):
        K.densify(B, A, v, idx.float(), 0.5)
    with pytest.raises(ValueError, match="share one floating dtype"):
        K.densify(B, A.double(), v, idx, 0.5)
    with pytest.raises(ValueError, match="scale=nan"):
        K.densify(B, A, v, idx, float("nan"))
    with pytest.raises(ValueError, match="dy has 37 tokens but x has 36"):
        K.sddmm(dy, x[:-1], idx)
    with pytest.raises(ValueError, match="backend='gpu'"):
        K.sddmm(dy, x, idx, backend="gpu")


# 4 ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("blocks", [(32, 16), (16, 64), (128, 128)])
def test_tile_layout_enumerates_the_support(blocks):
    out_f, in_f = 67, 45
    idx = C.make_support(out_f, in_f, "empty_rows", 0.3).long()
    bm, bn = blocks
    t = K.build_tile_layout(idx, out_f, in_f, bm, bn)
    assert t.perm.dtype == torch.int32 and t.tile_ptr.dtype == torch.int32 and t.loc.dtype == torch.int16
    assert t.tile_ptr[-1].item() == idx.numel() and torch.all(t.tile_ptr[1:] >= t.tile_ptr[:-1])
    tile_of = torch.repeat_interleave(torch.arange(t.n_tiles_m * t.n_tiles_n), t.tile_ptr.diff().long())
    rows = (tile_of // t.n_tiles_n) * bm + t.loc.long() // bn
    cols = (tile_of % t.n_tiles_n) * bn + t.loc.long() % bn
    assert torch.equal(rows * in_f + cols, idx[t.perm.long()])  # every entry lands where it belongs
    assert torch.equal(t.perm.sort().values.long(), torch.arange(idx.numel()))  # a permutation
    with pytest.raises(ValueError, match="outside"):
        K.build_tile_layout(torch.tensor([0, out_f * in_f]), out_f, in_f, bm, bn)


@pytest.mark.parametrize("path", ["dense", "factored"])
def test_resident_index_bytes_are_the_canonical_4_per_nnz(path):
    """After forward + backward nothing index-like outlives the call: every integer tensor created
    inside it (CSR row pointers, column indices, the transposition permutation) is gone, so the
    resident index memory is the canonical int32 index, 4 bytes per nonzero."""
    layer = SLLinear(512, 1376, rank=8, density=0.03, alpha=16.0, name="fc1", path=path)
    assert layer.idx.dtype == torch.int32
    x = torch.randn(16, 512)
    with C.IntTensorTracker() as created:
        layer(x).sum().backward()
    assert created.alive_bytes() == 0, created.alive()
    report = K.index_report(layer.layout, "cpu")
    assert report["nnz"] == layer.nnz
    assert report["per_nnz"]["canonical"] == 4.0 and report["per_nnz"]["total"] == 4.0
    tiles = K.build_tile_layout(layer.layout.flat(torch.device("cpu")), 1376, 512, 128, 128)
    assert abs(tiles.nbytes() / layer.nnz - 6.0) < 0.1  # what each launch derives: int32 perm + int16 loc


# 5 ---------------------------------------------------------------------------------------------

PRESETS = {"60M": (512, 1376, 128), "130M": (768, 2048, 256)}  # (in, out, rank) of the MLP up-projection


@pytest.mark.parametrize("preset", list(PRESETS))
def test_cost_model_choices_at_preset_shapes(preset, monkeypatch):
    monkeypatch.delenv("MEGATRON_SL_SPARSE_EFFICIENCY", raising=False)
    n, m, r = PRESETS[preset]
    for out_f, in_f in ((m, n), (n, m)):  # fc1 and fc2
        nnz = int(0.03 * out_f * in_f)
        assert cost_model.choose_path(512, out_f, in_f, r, nnz, "cpu") == "factored"
        assert cost_model.choose_path(4096, out_f, in_f, r, nnz, "cuda") == "dense"
        costs = cost_model.path_costs(512, out_f, in_f, r, nnz, cost_model.sparse_efficiency("cpu"))
        assert costs["factored"] < costs["dense"]
    # density 0 (the low-rank baseline) at small T is always factored
    assert cost_model.choose_path(512, m, n, r, 0, "cuda") == "factored"


def test_auto_path_follows_cost_model_and_paths_agree(monkeypatch):
    taken = []
    for name, fn in list(core_fn.FUNCTIONS.items()):
        spy = type(f"Spy{name}", (), {"apply": staticmethod(lambda *a, _fn=fn, _n=name: (taken.append(_n),
                                                                                       _fn.apply(*a))[1])})
        monkeypatch.setitem(core_fn.FUNCTIONS, name, spy)
    layer = SLLinear(96, 160, rank=8, density=0.05, alpha=16.0, name="p", dtype=torch.float64)
    with torch.no_grad():
        layer.B.normal_()
    for T in (4, 3000):
        x = torch.randn(T, 96, dtype=torch.float64)
        expected = cost_model.choose_path(T, 160, 96, 8, layer.nnz, "cpu")
        taken.clear()
        layer(x)
        assert taken == [expected]
    x = torch.randn(2, 37, 96, dtype=torch.float64)
    gy = torch.randn(2, 37, 160, dtype=torch.float64)
    results = {}
    for path in ("dense", "factored"):
        params = {k: p.detach().clone().requires_grad_(True) for k, p in (("B", layer.B), ("A", layer.A),
                                                                           ("values", layer.values))}
        xl = x.clone().requires_grad_(True)
        y = K.sl_linear(xl, params["B"], params["A"], params["values"], layer.layout, layer.scale, path=path)
        y.backward(gy)
        results[path] = [y, xl.grad] + [params[k].grad for k in ("B", "A", "values")]
    for a, b in zip(results["dense"], results["factored"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# 6 ---------------------------------------------------------------------------------------------

def _run(cmd, env, timeout):
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, f"$ {' '.join(map(str, cmd))}\n--- stdout\n{proc.stdout[-8000:]}\n--- stderr\n{proc.stderr[-4000:]}"


@pytest.mark.slow
def test_interpreter_suite(tmp_path):
    """Runs interp_cases.py (Triton kernels on CPU tensors, numerics vs float64) in its own process."""
    table = tmp_path / "numerics.json"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", SL_NUMERICS_JSON=str(table),
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop(settings.ENV_BACKEND, None)
    proc, log = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "interp_cases.py")],
                     env, timeout=900)
    assert proc.returncode == 0, log
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], log
    rows = json.loads(table.read_text())
    print("\n| kernel | dtype | Triton (interpreter) | torch reference | tolerance |")
    for r in rows:
        kind = "op" if r["kernel"] in ("densify", "sddmm") else "linear"
        tol = C.TOL[C.DTYPES[r["dtype"]]][kind]
        print(f"| {r['kernel']} | {r['dtype']} | {r['triton']:.2e} | {r['torch']:.2e} | {tol:.0e} |")
        assert r["triton"] <= tol
    assert {(r["kernel"], r["dtype"]) for r in rows} >= {(k, d) for k in ("densify", "sddmm") for d in C.DTYPES}


@pytest.mark.slow
def test_aot_compile_for_sm80_sm90(tmp_path):
    """Every kernel compiles to cubin for sm_80 and sm_90 (bf16, fp32 TF32 and fp32 IEEE), with
    shared memory under the limit and tensor-core instructions where expected."""
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a cache
    proc, log = _run([sys.executable, str(ROOT / "kernels" / "aot_compile.py"), "--json", str(out)], env, timeout=600)
    assert proc.returncode == 0, log
    rows = json.loads(out.read_text())
    expected = {(k, a) for k in ("densify", "sddmm") for a in ("sm_80", "sm_90")}
    assert {(r["kernel"], r["arch"]) for r in rows} == expected
    assert len(rows) == 12 and all(r["ok"] for r in rows), log
    for r in rows:
        assert 0 < r["shared"] <= r["shared_limit"], r
        if r["variant"] != "fp32-ieee":
            assert (r["wgmma"] if r["arch"] == "sm_90" else r["mma"]), r
