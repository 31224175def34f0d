"""Compile-only build check of the SL Triton kernels for real GPUs, on a machine without one.

Compiles every kernel in ``megatron_sl.kernels.triton_kernels`` ahead of time, through Triton's
own pipeline down to cubin (ptxas from the triton wheel, no CUDA driver), for sm_80 (A100) and
sm_90 (H100/H200), with the block sizes and warps the launchers use on GPU
(``megatron_sl.kernels.settings.GPU_DENSIFY`` / ``GPU_SDDMM``) and three operand types: bf16
(tensor cores), fp32 with TF32 dots (tensor cores) and fp32 with IEEE dots (FMA). For each it
records compile time, shared memory and whether the PTX uses mma / wgmma.

It fails (exit 1) when a compile fails, shared memory exceeds the architecture's per-block
limit, or a tensor-core variant has no mma/wgmma in its PTX.

Run it WITHOUT ``TRITON_INTERPRET`` (the interpreter replaces the kernels with Python objects):

    python kernels/aot_compile.py [--arch 80 90] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

# per-block shared memory limits (opt-in maximum), bytes
SHARED_LIMIT = {80: 166912, 90: 232448}
VARIANTS = {
    "bf16": {"ptr": "*bf16", "precision": "tf32", "tensor_cores": True},
    "fp32-tf32": {"ptr": "*fp32", "precision": "tf32", "tensor_cores": True},
    "fp32-ieee": {"ptr": "*fp32", "precision": "ieee", "tensor_cores": False},
}


def _specs(variant: str):
    """(kernel name, kernel, signature, constexprs, options) as the GPU launchers call them:
    contiguous operands, so unit strides are specialised to the constant 1 like Triton's JIT does."""
    from megatron_sl.kernels import settings, triton_kernels as tk

    v = VARIANTS[variant]
    d, s = settings.GPU_DENSIFY, settings.GPU_SDDMM
    densify_sig = {"B_ptr": v["ptr"], "A_ptr": v["ptr"], "W_ptr": v["ptr"], "val_ptr": v["ptr"],
                   "perm_ptr": "*i32", "loc_ptr": "*i16", "tile_ptr_ptr": "*i32",
                   "OUT": "i32", "IN": "i32", "R": "i32", "scale": "fp32",
                   "stride_bo": "i32", "stride_br": "constexpr", "stride_ar": "i32", "stride_ai": "constexpr",
                   "stride_wo": "i32", "stride_wi": "constexpr",
                   "BM": "constexpr", "BN": "constexpr", "BR": "constexpr", "BS": "constexpr",
                   "UPCAST": "constexpr", "INPUT_PRECISION": "constexpr"}
    densify_const = {"stride_br": 1, "stride_ai": 1, "stride_wi": 1, "BM": d.block_m, "BN": d.block_n,
                     "BR": d.block_r, "BS": d.block_s, "UPCAST": False, "INPUT_PRECISION": v["precision"]}
    sddmm_sig = {"dy_ptr": v["ptr"], "x_ptr": v["ptr"], "out_ptr": v["ptr"],
                 "perm_ptr": "*i32", "loc_ptr": "*i16", "tile_ptr_ptr": "*i32",
                 "OUT": "i32", "IN": "i32", "T": "i32",
                 "stride_dt": "i32", "stride_do": "constexpr", "stride_xt": "i32", "stride_xi": "constexpr",
                 "BM": "constexpr", "BN": "constexpr", "BT": "constexpr", "BS": "constexpr",
                 "UPCAST": "constexpr", "INPUT_PRECISION": "constexpr"}
    sddmm_const = {"stride_do": 1, "stride_xi": 1, "BM": s.block_m, "BN": s.block_n, "BT": s.block_t,
                   "BS": s.block_s, "UPCAST": False, "INPUT_PRECISION": v["precision"]}
    return [
        ("densify", tk.densify_kernel, densify_sig, densify_const,
         {"num_warps": d.num_warps, "num_stages": d.num_stages}),
        ("sddmm", tk.sddmm_kernel, sddmm_sig, sddmm_const,
         {"num_warps": s.num_warps, "num_stages": s.num_stages}),
    ]


def _divisibility_attrs(fn, signature):
    """Pointers and integer arguments 16-divisible (torch allocations, the preset shapes), as the
    JIT would specialise them at a real launch."""
    attrs = {}
    for name, ty in signature.items():
        if ty.startswith("*") or ty == "i32":
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    return attrs


def compile_all(archs=(80, 90), variants=tuple(VARIANTS)):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from megatron_sl.kernels import triton_kernels as tk
    if tk.INTERPRETED:
        raise RuntimeError("TRITON_INTERPRET=1 is set: the kernels are interpreted and cannot be compiled; "
                           "run this without it")
    results = []
    for arch in archs:
        for variant in variants:
            for name, fn, sig, const, options in _specs(variant):
                row = {"kernel": name, "arch": f"sm_{arch}", "variant": variant, **options}
                t0 = time.perf_counter()
                try:
                    src = ASTSource(fn, sig, const, _divisibility_attrs(fn, sig))
                    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                except Exception as exc:  # a lowering error is the finding; report it
                    row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
                    results.append(row)
                    continue
                ptx = ck.asm["ptx"]
                row.update(ok=True, seconds=round(time.perf_counter() - t0, 2), shared=ck.metadata.shared,
                           shared_limit=SHARED_LIMIT[arch], cubin_bytes=len(ck.asm["cubin"]),
                           mma="mma.sync" in ptx or "mma.async" in ptx, wgmma="wgmma.mma_async" in ptx,
                           tensor_cores_expected=VARIANTS[variant]["tensor_cores"])
                results.append(row)
    return results


def problems(results) -> list:
    out = []
    for r in results:
        tag = f"{r['kernel']} {r['arch']} {r['variant']}"
        if not r["ok"]:
            out.append(f"{tag}: compile failed: {r['error']}")
            continue
        if r["shared"] > r["shared_limit"]:
            out.append(f"{tag}: shared memory {r['shared']} B exceeds the {r['shared_limit']} B limit")
        if r["tensor_cores_expected"] and not (r["mma"] or r["wgmma"]):
            out.append(f"{tag}: no mma/wgmma instruction in the PTX")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT),
                    help="compute capabilities to compile for")
    ap.add_argument("--variant", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                    help="operand types to compile")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    results = compile_all(args.arch, args.variant)
    print("| kernel | arch | variant | ok | compile s | shared B | mma.sync | wgmma |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['kernel']} | {r['arch']} | {r['variant']} | {r['ok']} | {r.get('seconds', '-')} | "
              f"{r.get('shared', '-')} | {r.get('mma', '-')} | {r.get('wgmma', '-')} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    bad = problems(results)
    for p in bad:
        print("FAIL:", p, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
