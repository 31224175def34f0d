"""Shared cases, float64 references and the tolerance table of the SL kernel tests.

Used by the interpreter suite (``interp_cases.py``, CPU tensors under ``TRITON_INTERPRET=1``) and
by the GPU suite (``test_gpu.py``, CUDA tensors), so both run the same checks.

Error metric: ``rel_err(got, ref) = max|got - ref| / max|ref|`` against a float64 reference
computed from the same (already rounded) inputs, so it measures the kernel's arithmetic only.
Tolerances per dtype (bf16 has an 8-bit mantissa, unit roundoff 2^-9 ≈ 2e-3):

| dtype | op (densify, sddmm) | whole SL linear, outputs and grads |
|---|---|---|
| fp32 | 1e-5 | 1e-4 |
| bf16 | 1e-2 | 3e-2 |
"""

from __future__ import annotations

import gc

import torch

from megatron_sl.core.functional import SupportLayout

TOL = {
    torch.float32: {"op": 1e-5, "linear": 1e-4},
    torch.bfloat16: {"op": 1e-2, "linear": 3e-2},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# (out, in, rank, tokens, support kind, density); odd shapes, smaller and larger than blocks.
OP_CASES = {
    "odd-random": (67, 45, 5, 37, "random", 0.11),
    "ragged-dense-ish": (150, 97, 9, 70, "random", 0.37),   # nnz not a multiple of any block
    "density0": (33, 50, 3, 19, "random", 0.0),
    "tiny-3nnz": (41, 29, 2, 23, "tiny", None),
    "empty-rows": (96, 70, 4, 33, "empty_rows", 0.2),       # every 3rd row, and a whole row band, empty
    "one-row": (1, 64, 1, 17, "random", 0.5),
}
LINEAR_CASES = {
    "odd-random": (70, 45, 6, (2, 19), "random", 0.1),
    "density0": (40, 33, 4, (23,), "random", 0.0),
    "empty-rows": (96, 70, 5, (3, 11), "empty_rows", 0.2),
}


def make_support(out_f: int, in_f: int, kind: str, density, seed: int = 0) -> torch.Tensor:
    """Sorted int32 flat row-major support of the requested kind."""
    g = torch.Generator().manual_seed(seed)
    numel = out_f * in_f
    if kind == "random":
        idx = torch.randperm(numel, generator=g)[: int(density * numel)]
    elif kind == "tiny":
        idx = torch.randperm(numel, generator=g)[:3]
    elif kind == "empty_rows":
        idx = torch.randperm(numel, generator=g)[: int(density * numel)]
        rows = idx // in_f
        keep = (rows % 3 != 1) & ((rows < out_f // 3) | (rows >= 2 * out_f // 3))
        idx = idx[keep]
    else:
        raise ValueError(f"unknown support kind {kind!r}")
    return idx.sort().values.to(torch.int32)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    if ref.numel() == 0:
        return 0.0 if got.numel() == 0 else float("inf")
    scale = ref.abs().max().item()
    return (got - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def op_inputs(case, dtype, device, seed: int = 0):
    """B, A, values, idx (int64 on device, as core hands it to the ops), dy [T, out], x [T, in]."""
    out_f, in_f, r, T, kind, density = case
    g = torch.Generator().manual_seed(seed + 1)
    idx = make_support(out_f, in_f, kind, density, seed).to(device=device, dtype=torch.int64)
    mk = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return mk(out_f, r), mk(r, in_f), mk(idx.numel()), idx, mk(T, out_f), mk(T, in_f)


def densify_f64(B, A, values, idx, scale):
    W = scale * (B.double() @ A.double())
    W.view(-1).index_add_(0, idx.long(), values.double())
    return W


def sddmm_f64(dy, x, idx):
    return (dy.double().t() @ x.double()).reshape(-1)[idx.long()]


def linear_inputs(case, dtype, device, seed: int = 0, bias: bool = True):
    out_f, in_f, r, lead, kind, density = case
    g = torch.Generator().manual_seed(seed + 2)
    idx = make_support(out_f, in_f, kind, density, seed)
    mk = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    params = {"B": mk(out_f, r), "A": mk(r, in_f) / in_f ** 0.5, "values": mk(idx.numel()) / in_f ** 0.5,
              "bias": mk(out_f) if bias else None}
    x = mk(*lead, in_f)
    gy = mk(*lead, out_f)
    layout = SupportLayout(idx.to(device), out_f, in_f)
    return params, x, gy, layout


def linear_grads(fn, params, x, gy):
    """Output and grads of (x, B, A, values, bias) of y = fn(x, **params) for upstream grad gy."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items() if v is not None}
    xl = x.detach().clone().requires_grad_(True)
    y = fn(xl, **leaves)
    y.backward(gy)
    grads = {"x": xl.grad, **{k: v.grad for k, v in leaves.items()}}
    return y.detach(), grads


def reference_linear_f64(x, B, A, values, bias, idx, scale):
    W = densify_f64(B, A, values, idx, scale)
    y = x.double() @ W.t()
    return y + bias.double() if bias is not None else y


def check_linear(sl_linear, case, dtype, device, path, scale=0.75):
    """Run the SL linear (whatever primitives are installed) and the float64 autograd reference;
    return {name: rel_err} for the output and every gradient."""
    params, x, gy, layout = linear_inputs(case, dtype, device)
    idx = layout.flat(torch.device(device))

    def run(xl, B, A, values, bias=None):
        return sl_linear(xl, B, A, values, layout, scale, bias=bias, path=path)

    def ref(xl, B, A, values, bias=None):
        return reference_linear_f64(xl, B, A, values, bias, idx, scale)

    y, grads = linear_grads(run, params, x, gy)
    p64 = {k: (v.double() if v is not None else None) for k, v in params.items()}
    y64, grads64 = linear_grads(ref, p64, x.double(), gy.double())
    errs = {"y": rel_err(y, y64)}
    for k in grads64:
        assert grads[k] is not None, f"no gradient for {k}"
        expected = x.dtype if k == "x" else params[k].dtype
        assert grads[k].dtype == expected, f"grad of {k} is {grads[k].dtype}, expected {expected}"
        errs["d" + k] = rel_err(grads[k], grads64[k])
    return errs


def count_launches(monkeypatch) -> dict:
    """Count calls of the Triton launchers (so a silent fallback to the torch reference fails a test)."""
    from megatron_sl.kernels import triton_kernels as tk

    counts = {"densify": 0, "sddmm": 0}
    for name in counts:
        real = getattr(tk, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(tk, name, counting)
    return counts


class IntTensorTracker:
    """Context manager: the integer tensors (index structures) that appeared during the region and
    are still alive after it, found by scanning the garbage collector's objects before and after
    (so a cache held anywhere in Python -- a dict, an object attribute -- is found)."""

    @staticmethod
    def _live() -> dict:
        gc.collect()
        return {id(o): o for o in gc.get_objects()
                if isinstance(o, torch.Tensor) and not o.dtype.is_floating_point and o.dtype != torch.bool}

    def __enter__(self):
        self._before = set(self._live())
        return self

    def __exit__(self, *exc):
        self._after = {k: t for k, t in self._live().items() if k not in self._before}
        return False

    def alive(self) -> list:
        return [(tuple(t.shape), t.dtype) for t in self._after.values()]

    def alive_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._after.values())
