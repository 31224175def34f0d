"""SL linear forward+backward time and peak memory vs dense nn.Linear and vs the paper-style
implementation, at the 60M and 130M preset shapes, fp32, measured side by side in one run.

    python benchmarks/bench_sl_linear.py [--threads 1] [--reps 7] [--tokens 4096 512]

Each repetition runs every variant once in a fixed interleaved order; the table gives the
median time, its ratio to dense in the same run, the peak bytes held by tensors created during
one forward+backward (``memtrack.LiveTensorTracker``) and the bytes autograd saves for backward.
CPU numbers; on a shared 2-core box absolute times are noisy, ratios less so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.memtrack import LiveTensorTracker, saved_bytes  # noqa: E402
from benchmarks.paper_style import PaperSLLinear  # noqa: E402
from megatron_sl.core import SLLinear  # noqa: E402

SHAPES = {"60M mlp (512->1376, r=128)": (512, 1376, 128, 32.0),
          "130M mlp (768->2048, r=256)": (768, 2048, 256, 16.0)}
DENSITY = 0.03


def make_variants(in_f, out_f, rank, alpha):
    sl = {p: SLLinear(in_f, out_f, rank, DENSITY, alpha, name="bench", path=p) for p in ("auto", "dense", "factored")}
    with torch.no_grad():
        for layer in sl.values():
            layer.B.normal_(std=0.02)
    return {
        "dense nn.Linear": nn.Linear(in_f, out_f, bias=False),
        "paper-style SL": PaperSLLinear(sl["dense"]),
        "SL auto": sl["auto"],
        "SL dense-path": sl["dense"],
        "SL factored-path": sl["factored"],
    }


def step(module, x, gy):
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(gy)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 512])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# SL linear fwd+bwd, fp32, CPU, {args.threads} thread(s), density {DENSITY}, median of {args.reps}\n")
    print("| shape | T | variant | path | ms | ratio vs dense | peak MiB | saved MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for shape_name, (in_f, out_f, rank, alpha) in SHAPES.items():
        variants = make_variants(in_f, out_f, rank, alpha)
        for T in args.tokens:
            x = torch.randn(T, in_f, requires_grad=True)
            gy = torch.randn(T, out_f)
            times = {k: [] for k in variants}
            for k, m in variants.items():
                step(m, x, gy)  # warm-up (also builds the cached index layouts)
            for _ in range(args.reps):
                for k, m in variants.items():
                    t0 = time.perf_counter()
                    step(m, x, gy)
                    times[k].append(time.perf_counter() - t0)
            dense_ms = statistics.median(times["dense nn.Linear"]) * 1e3
            for k, m in variants.items():
                m.zero_grad(set_to_none=True)
                x.grad = None
                tracker = LiveTensorTracker()
                with tracker:
                    sb, y = saved_bytes(lambda: m(x), params=list(m.parameters()))
                    y.backward(gy)
                ms = statistics.median(times[k]) * 1e3
                path = ""
                if isinstance(m, SLLinear):
                    from megatron_sl.core import cost_model
                    path = m.path if m.path != "auto" else cost_model.choose_path(T, out_f, in_f, rank, m.nnz, "cpu")
                print(f"| {shape_name} | {T} | {k} | {path} | {ms:.1f} | {ms / dense_ms:.3f} | "
                      f"{tracker.peak / 2**20:.1f} | {sb / 2**20:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
