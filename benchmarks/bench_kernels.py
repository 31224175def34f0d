"""Benchmark of the SL linear's kernels and execution paths against the torch reference and dense.

One run measures, side by side and interleaved (every round times every variant once, so load
changes hit all of them alike; ratios are the median over rounds of variant / dense of the same
round), at the 60M and 130M preset MLP shapes (512->1376, r=128 and
768->2048, r=256; density 0.03) and T = 512 and 4096 tokens:

* full forward + backward of one layer: dense ``nn.Linear`` (the baseline), the SL dense path,
  the SL factored path, and ``auto`` (the path ``core.cost_model`` picks);
* the primitives: densify (W = s·B A + S) and the values-gradient SDDMM, each as the torch
  reference and -- on CUDA only -- as the Triton kernel, next to the dense GEMM of the same size
  (x Wᵀ for densify, dYᵀ X for the SDDMM, i.e. what a dense layer spends there).

On a machine without CUDA everything is labelled CPU and the Triton kernels are NOT timed: they
would only run in the Triton interpreter (Python, orders of magnitude slower, meaningless for
speed); timed there instead are the numba CPU kernels that a one-thread CPU rank dispatches to
(SpMM, SDDMM, and the factored path on them) next to the torch references they replace.

Also prints the index bytes per nnz of each layer (canonical int32, derived structures).

    python benchmarks/bench_kernels.py [--reps 7] [--tokens 512 4096] [--dtype fp32] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import megatron_sl.kernels as K  # noqa: E402
from megatron_sl.core import SLLinear, cost_model  # noqa: E402
from megatron_sl.core import functional as core_fn  # noqa: E402

PRESETS = {"60M": (512, 1376, 128), "130M": (768, 2048, 256)}  # in, out, rank
DENSITY = 0.03
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _interleaved(fns: dict, reps: int, device) -> dict:
    """{name: [seconds per round]}; one warm-up call each, then ``reps`` rounds over all fns."""
    for fn in fns.values():
        fn()
    _sync(device)
    times = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def _fwd_bwd(fn, x, gy, params):
    def run():
        for p in params:
            p.grad = None
        xl = x.detach().requires_grad_(True)
        fn(xl).backward(gy)
    return run


def bench_shape(preset, T, dtype, device, reps):
    in_f, out_f, r = PRESETS[preset]
    layer = SLLinear(in_f, out_f, rank=r, density=DENSITY, alpha=32.0, name=f"{preset}.fc1", dtype=dtype,
                     device=device)
    with torch.no_grad():
        layer.B.normal_(0, 0.02)  # B starts at zero; any values do for timing
    dense = torch.nn.Linear(in_f, out_f, bias=False, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, in_f, generator=g).to(device=device, dtype=dtype)
    gy = torch.randn(T, out_f, generator=g).to(device=device, dtype=dtype)
    params = [layer.B, layer.A, layer.values]
    chosen = cost_model.choose_path(T, out_f, in_f, r, layer.nnz, device.type)

    def sl(path):
        return lambda xl: core_fn.sl_linear(xl, layer.B, layer.A, layer.values, layer.layout, layer.scale, path=path)

    idx = layer.layout.flat(device)
    W = layer.to_dense()
    with torch.no_grad():
        dense.weight.copy_(W)
    fns = {
        "dense nn.Linear": _fwd_bwd(dense, x, gy, [dense.weight]),
        "SL dense path": _fwd_bwd(sl("dense"), x, gy, params),
        "SL factored path": _fwd_bwd(sl("factored"), x, gy, params),
        f"SL auto (={chosen})": _fwd_bwd(sl("auto"), x, gy, params),
        "GEMM x·Wᵀ": lambda: F.linear(x, W),
        "densify (torch ref)": lambda: core_fn.densify_reference(layer.B, layer.A, layer.values, idx, layer.scale),
        "GEMM dYᵀ·X": lambda: gy.t() @ x,
        "sddmm (torch ref)": lambda: core_fn.sddmm_reference(gy, x, layer.layout),
        "dYᵀ·X + gather (values_grad)": lambda: core_fn.values_grad_reference(gy.t() @ x, idx),
        # derived per call instead of kept resident (index memory stays at the canonical 4 B/nnz)
        "CSR of S and Sᵀ (per factored call)": lambda: (layer.layout.csr(layer.values.detach()),
                                                       layer.layout.csr_t(layer.values.detach())),
        "tile layout (per Triton launch)": lambda: K.build_tile_layout(idx, out_f, in_f, K.settings.GPU_DENSIFY.block_m,
                                                                      K.settings.GPU_DENSIFY.block_n),
    }
    if device.type == "cpu":  # the numba kernels (what auto runs on a one-thread CPU rank) vs the torch reference
        from megatron_sl.kernels import cpu_kernels

        def torch_sparse(fn):
            def run():
                with K.use_backend("torch"):
                    fn()
            return run

        vals = layer.values.detach()
        fns["SL factored path, torch-reference sparse products"] = torch_sparse(
            _fwd_bwd(sl("factored"), x, gy, params))
        fns["SpMM x·Sᵀ (torch ref)"] = lambda: core_fn.spmm_accumulate_reference(
            torch.zeros(T, out_f, dtype=dtype), layer.layout, vals, x, False)
        fns["SpMM x·Sᵀ (numba)"] = lambda: cpu_kernels.spmm_accumulate(torch.zeros(T, out_f, dtype=dtype), x, idx,
                                                                       vals, False)
        fns["sddmm (numba)"] = lambda: cpu_kernels.sddmm(gy, x, idx)
    if device.type == "cuda":
        fns["densify (Triton)"] = lambda: K.densify(layer.B, layer.A, layer.values, idx, layer.scale, backend="triton")
        fns["sddmm (Triton)"] = lambda: K.sddmm(gy, x, idx, backend="triton")
    times = _interleaved(fns, reps, device)
    base = times["dense nn.Linear"]
    # ratio = median over rounds of (variant / dense of the same round): robust to load drift
    return layer, chosen, {k: (statistics.median(v), min(v), statistics.median(a / b for a, b in zip(v, base)))
                           for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per variant (median reported)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 4096], help="token counts T")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error(f"--reps={args.reps} must be >= 1")
    if any(t < 1 for t in args.tokens):
        ap.error(f"--tokens={args.tokens} must all be >= 1")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    label = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU ({args.threads} thread{'s' if args.threads > 1 else ''})")
    print(f"# SL linear kernels and paths: {label}, {args.dtype}, density {DENSITY}; ms = median (min) of "
          f"{args.reps} interleaved rounds; ratios = median over rounds of variant / dense nn.Linear fwd+bwd")
    if device.type != "cuda":
        print("\nCPU run: the Triton kernels are not timed (on CPU they only run in the Triton interpreter, "
              "which says nothing about speed); timed are the numba CPU kernels that auto runs on a one-thread "
              "CPU rank (the SL paths use them) next to the torch references.")
    reports = []
    for preset in args.presets:
        for T in args.tokens:
            layer, chosen, res = bench_shape(preset, T, dtype, device, args.reps)
            in_f, out_f, r = PRESETS[preset]
            print(f"\n## {preset}: {in_f}->{out_f}, r={r}, nnz={layer.nnz}, T={T} ({label})\n")
            print("| variant | ms (min) | / dense fwd+bwd | / matching dense GEMM |")
            print("|---|---|---|---|")
            for name, (med, mn, ratio) in res.items():
                if name.startswith("dense nn.Linear") or name.startswith("SL "):
                    print(f"| **{name}** | {med * 1e3:.2f} ({mn * 1e3:.2f}) | **{ratio:.2f}** | |")
                    continue
                gemm = None
                if name.startswith("densify"):
                    gemm = res["GEMM x·Wᵀ"][0]
                elif name.startswith("sddmm") or name.startswith("dYᵀ·X +"):
                    gemm = res["GEMM dYᵀ·X"][0]
                per_gemm = "" if gemm is None else f"{med / gemm:.2f}"
                print(f"| {name} | {med * 1e3:.2f} ({mn * 1e3:.2f}) | {ratio:.2f} | {per_gemm} |")
            reports.append((preset, T, res["SL factored path"][2], res[f"SL auto (={chosen})"][2],
                            res["SL dense path"][2], chosen, K.index_report(layer.layout, device)))
    print(f"\n## Summary ({label}): SL fwd+bwd time / dense nn.Linear fwd+bwd (target <= 1.2 at T=512, factored)\n")
    print("| preset | T | factored / dense | dense path / dense | auto / dense | auto picks |")
    print("|---|---|---|---|---|---|")
    for preset, T, fac, auto, dpath, chosen, _ in reports:
        print(f"| {preset} | {T} | {fac:.2f} | {dpath:.2f} | {auto:.2f} | {chosen} |")
    print("\n## Resident index bytes per nnz after forward + backward (per layer; CSR forms and Triton tile "
          "layouts are derived per call, not kept)\n")
    print("| preset | canonical int32 idx | device copy | core CSR/CSC | Triton tile layouts | total |")
    print("|---|---|---|---|---|---|")
    seen = set()
    for preset, *_, rep in reports:
        if preset in seen:
            continue
        seen.add(preset)
        p = rep["per_nnz"]
        print(f"| {preset} | {p['canonical']:.2f} | {p['device_flat']:.2f} | {p['core_derived']:.2f} | "
              f"{p['tile_layouts']:.2f} | {p['total']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
