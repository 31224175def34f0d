"""Whole-training-step benchmark: SL vs dense vs low-rank, side by side in one run.

Part 1, throughput: for each preset (default ``tiny`` and ``60m``) the three variants are built
in one process as real DeepSpeed engines (ZeRO-1, torch AdamW, fp32 on CPU / bf16 on GPU, the
same code path as ``megatron-sl train``) and timed round-robin, one full training step
(forward + backward + optimizer step on a global batch of random tokens) per variant per round,
so machine load drifts hit all three alike. Reported: median step time, tokens/s, ratio to dense.

Part 2, peak memory at the ``130m`` shape, SL vs dense: each variant in its own fresh process
(peak RSS is per process) builds the model and engine and runs a few steps; reported is the peak
above the RSS measured just before the model was built (CPU) or ``torch.cuda.max_memory_allocated``
(GPU), plus parameter and optimizer-state bytes.

Part 3, tensor-parallel communication (``--tp2``): 2 gloo ranks, TP=2, the ``60m`` shape with
gradient accumulation 4 (micro-batch 1), real ``megatron-sl train`` runs (ZeRO-1) on a small prepared
corpus: SL with the replicated-factor gradients summed over TP once per step ("after"), SL with them
all-reduced per part in every micro-batch's backward as before ("before", emulated with per-parameter
gradient hooks and the once-per-step sum switched off; same numerics), "after" with ``sl.save_xa``
(x·Aᵀ kept for backward: one GEMM less per SL part and micro-batch, T·r more activations), and
dense. Reported: median step time, tokens/s, rank 0's user and system CPU seconds per step (user
time is the compute; steal time on a shared host inflates wall time but not user time, and system
time shows page-fault cost), and bytes all-reduced per step on the TP group, split into gradient
reductions and activations/loss.
``--tp2-rounds N`` runs each mode N times, alternating, and pools the step times (a fairer ratio on a
machine whose load drifts).

    python benchmarks/bench_train.py                 # parts 1 and 2, default sizes (CPU: ~10 min)
    python benchmarks/bench_train.py --rounds 5 --presets tiny --memory-preset 130m
    python benchmarks/bench_train.py --tp2 --no-throughput --no-memory    # part 3 only (CPU: ~5 min)

Single rank (world size 1, gloo on CPU / nccl on GPU). Results are for the device printed in the
header; on CPU they measure this machine's CPU kernels, not GPU behaviour.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from megatron_sl.constants import VARIANTS

REPO = Path(__file__).resolve().parents[1]


def rank_env(port: int) -> dict:
    env = dict(os.environ)
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    return env


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0: ``5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def index_bytes(module) -> int:
    """Resident bytes of the SL supports' index structures (the canonical index; nothing derived is kept)."""
    from megatron_sl.core.functional import SupportLayout

    seen, total = set(), 0
    for m in module.modules():
        lay = getattr(m, "layout", None)
        if isinstance(lay, SupportLayout) and id(lay) not in seen:
            seen.add(id(lay))
            total += sum(lay.index_bytes().values())
    return total


def build(preset: str, variant: str, micro: int, seq: int | None, zero: int, device: str):
    """One DeepSpeed engine exactly as the trainer builds it, without data (random tokens)."""
    import torch

    from megatron_sl.training.config import load_config
    from megatron_sl.training.distributed import init_distributed
    from megatron_sl.training.ds_engine import DeepSpeedTrainEngine
    from megatron_sl.training.schedule import WarmupCosine
    from megatron_sl.training.trainer import _build_model
    from megatron_sl.training.config_checks import make_plan

    overrides = [f"model.preset={preset}", f"model.variant={variant}", f"train.micro_batch_size={micro}",
                 f"train.global_batch_size={micro}", f"deepspeed.zero_stage={zero}", "train.train_iters=1000",
                 f"train.precision={'bf16' if device == 'cuda' else 'fp32'}", f"launch.device={device}"]
    if seq:
        overrides.append(f"model.seq_length={seq}")
    cfg = load_config(REPO / "configs" / "tiny_sl.yaml", overrides)
    plan = make_plan(cfg, 1, check_outputs=False, check_inputs=False)
    init_distributed(device, 1, cfg.train.seed, use_deepspeed=True)
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    model = _build_model(cfg, plan).to(dev)
    sched = WarmupCosine(cfg.optim.lr, plan.warmup_iters, cfg.train.train_iters, cfg.optim.min_lr_ratio)
    engine = DeepSpeedTrainEngine(model, cfg, plan, sched, device)
    gen = torch.Generator().manual_seed(0)
    s = plan.seq_length
    tokens = torch.randint(0, plan.tokenizer_vocab_size, (micro, s + 1), generator=gen)
    batch = {"tokens": tokens[:, :-1].to(dev), "labels": tokens[:, 1:].to(dev),
             "loss_mask": torch.ones(micro, s, device=dev),
             "position_ids": torch.arange(s, device=dev).expand(micro, s).contiguous(),
             "attention_mask": torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool, device=dev), diagonal=1)}
    params = sum(p.numel() for p in model.parameters())
    return engine, batch, plan, params


def step(engine, batch, device) -> float:
    import torch

    from megatron_sl.training.batches import masked_mean, per_token_loss

    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = masked_mean(per_token_loss(engine, batch), batch["loss_mask"])
    engine.backward(loss)
    engine.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def throughput(args, device) -> list:
    rows = []
    for preset in args.presets:
        micro = args.micro.get(preset, 4)
        built = {v: build(preset, v, micro, args.seq, args.zero, device) for v in VARIANTS}
        for v in VARIANTS:  # warm-up (first-step allocations, path caches)
            for _ in range(args.warmup):
                step(built[v][0], built[v][1], device)
        times = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for v in VARIANTS:
                times[v].append(step(built[v][0], built[v][1], device))
        tokens = micro * built["sl"][2].seq_length
        dense_tps = tokens / statistics.median(times["dense"])
        for v in VARIANTS:
            med = statistics.median(times[v])
            rows.append({"preset": preset, "variant": v, "params": built[v][3], "tokens_per_step": tokens,
                         "step_s_median": med, "step_s_min": min(times[v]), "tokens_per_s": tokens / med,
                         "vs_dense": tokens / med / dense_tps})
        del built
    return rows


def memory_child(args, device) -> dict:
    import torch

    from megatron_sl.training.distributed import import_deepspeed, init_distributed

    import_deepspeed(device)  # every import and the process group first: not part of the peak
    init_distributed(device, 1, 0, use_deepspeed=True)
    import megatron.core.models.gpt  # noqa: F401
    import megatron_sl.parallel.spec  # noqa: F401
    base = current_rss_mb()
    exact = reset_peak_rss()
    engine, batch, plan, params = build(args.memory_preset, args.variant, args.memory_micro, args.seq, args.zero,
                                        device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.memory_steps):
        step(engine, batch, device)
    nbytes, numel = engine.state_bytes()
    out = {"preset": args.memory_preset, "variant": args.variant, "params": params,
           "tokens_per_step": args.memory_micro * plan.seq_length, "opt_state_bytes": nbytes,
           "opt_state_bytes_per_param": nbytes / max(numel, 1),
           "param_bytes": sum(p.numel() * p.element_size() for p in engine.module.parameters()),
           "index_bytes": index_bytes(engine.module)}
    if device == "cuda":
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_kind"] = "cuda max_memory_allocated"
    else:
        out["peak_mb"] = peak_rss_mb() - base
        out["peak_kind"] = "peak RSS above the RSS before the model was built" + ("" if exact else " (approx.)")
    return out


def memory(args, device) -> list:
    rows = []
    for variant in ("sl", "dense"):
        cmd = [sys.executable, __file__, "--memory-child", "--variant", variant, "--memory-preset", args.memory_preset,
               "--memory-micro", str(args.memory_micro), "--memory-steps", str(args.memory_steps),
               "--zero", str(args.zero), "--device", device]
        if args.seq:
            cmd += ["--seq", str(args.seq)]
        env = rank_env(free_port())
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # freed tensors go back to the OS: cleaner peaks
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY ")]
        if proc.returncode != 0 or not line:
            raise RuntimeError(f"memory run {variant} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        rows.append(json.loads(line[-1][len("MEMORY "):]))
    return rows


def print_tables(device_name, rows, mem):
    if rows:
        print_throughput(device_name, rows)
    if mem:
        print_memory(device_name, mem)


def print_throughput(device_name, rows):
    print(f"\n## Training step throughput ({device_name}; DeepSpeed ZeRO-1, AdamW, 1 rank, random tokens)\n")
    print("| preset | variant | params | tokens/step | step (median) | tokens/s | vs dense |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['preset']} | {r['variant']} | {r['params']/1e6:.2f}M | {r['tokens_per_step']} | "
              f"{r['step_s_median']*1e3:.0f} ms | {r['tokens_per_s']:,.0f} | {r['vs_dense']:.2f}x |")


def print_memory(device_name, mem):
    if mem:
        print(f"\n## Peak memory of a training step at the {mem[0]['preset']} shape ({device_name}; "
              f"{mem[0]['peak_kind']})\n")
        print("| variant | params | param MB | optimizer state MB | int index MB | peak MB | vs dense |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        dense = next(m for m in mem if m["variant"] == "dense")["peak_mb"]
        for m in mem:
            print(f"| {m['variant']} | {m['params']/1e6:.2f}M | {m['param_bytes']/2**20:.0f} | "
                  f"{m['opt_state_bytes']/2**20:.0f} | {m['index_bytes']/2**20:.1f} | {m['peak_mb']:.0f} | "
                  f"{m['peak_mb']/dense:.2f}x |")


# sl_save_xa: "after" with sl.save_xa (x·Aᵀ kept for backward instead of recomputed)
TP2_MODES = ("sl_after", "sl_save_xa", "sl_before", "dense")


def tp2_worker(spec_path: str) -> int:
    """One rank of part 3: the runs of the modes its spec lists (``tp2`` passes one per worker), in one
    process group; rank 0 writes the results."""
    import contextlib

    import torch.distributed as dist

    from megatron_sl.parallel.grad_sync import partial_tp_grad_params
    from megatron_sl.training.config import load_config
    from megatron_sl.training.distributed import rank_env as env_of, silence_known_warnings
    from megatron_sl.training.trainer import Trainer
    from megatron_sl.training.config_checks import make_plan

    silence_known_warnings()
    spec = json.loads(Path(spec_path).read_text())
    results = {}
    for run_no, mode in enumerate(spec["modes"]):
        run_dir = Path(spec["out"], f"{run_no:02d}_{mode}")
        overrides = spec["overrides"] + [f"run.output_dir={run_dir}",
                                         f"model.variant={'dense' if mode == 'dense' else 'sl'}"]
        if mode == "sl_save_xa":
            overrides.append("sl.save_xa=true")
        cfg = load_config(None, overrides)
        trainer = Trainer(cfg, make_plan(cfg, env_of().world_size, check_outputs=False))
        if mode == "sl_before":  # the previous behaviour: every part's partial gradient, every micro-batch
            trainer.engine._sum_partial_grads_over_tp = lambda: 0
            def per_microbatch_sum(grad, _group=trainer.tp_group):
                grad = grad.clone()
                dist.all_reduce(grad, group=_group)
                return grad

            for prm in partial_tp_grad_params(trainer.engine.module):
                prm.register_hook(per_microbatch_sum)
        tally = {"grad_bytes": 0, "act_bytes": 0, "grad_calls": 0, "act_calls": 0}
        original = dist.all_reduce

        def counted(tensor, *a, _orig=original, **kw):
            if kw.get("group", a[1] if len(a) > 1 else None) is trainer.tp_group:
                kind = "grad" if tensor.dim() <= 2 and tensor.numel() > 2 else "act"
                tally[f"{kind}_bytes"] += tensor.numel() * tensor.element_size()
                tally[f"{kind}_calls"] += 1
            return _orig(tensor, *a, **kw)

        dist.all_reduce = counted
        # (user, system) CPU seconds of this rank's process per step: the compute, which steal time by
        # other tenants does not inflate, next to the page-fault (system) time, which they can
        cpu = []

        def cpu_timed(_step=trainer.train_step):
            t0 = os.times()
            out = _step()
            t1 = os.times()
            cpu.append((t1.user - t0.user, t1.system - t0.system))
            return out

        trainer.train_step = cpu_timed
        try:
            with contextlib.redirect_stdout(sys.stderr):
                summary = trainer.run()
        finally:
            dist.all_reduce = original
        steps = summary["steps"]
        recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        times = [r["step_time_s"] for r in recs if r["kind"] == "train"][1:]  # first step: warm-up
        step_s = statistics.median(times)  # rounds are pooled by ``tp2``, which runs one mode per worker
        results[mode] = {"step_s": step_s, "tokens_per_s": summary["tokens"] / steps / step_s, "times": times,
                         "cpu": cpu[1:], "params": summary["params"], **{k: v / steps for k, v in tally.items()}}
        del trainer
    if env_of().rank == 0:
        Path(spec["out"], "tp2.json").write_text(json.dumps(results, indent=1))
    return 0


def tp2(args) -> dict:
    """Part 3: prepare a small corpus, run the TP=2 worker under torchrun, return its results."""
    import tempfile

    from megatron_sl.corpus import prepare_demo_data

    out = Path(tempfile.mkdtemp(prefix="bench_tp2_"))
    data = prepare_demo_data(out / "data", vocab_size=512, sources=("pydoc",))
    overrides = ["model.preset=60m", f"model.seq_length={args.tp2_seq}", "model.vocab_size=32000",
                 f"data.prefix={data.prefix}", f"data.tokenizer={data.tokenizer_model}", "parallel.tensor_parallel=2",
                 "train.micro_batch_size=1", "train.global_batch_size=4", f"train.train_iters={args.tp2_steps}",
                 "deepspeed.zero_stage=1", "eval.iters=0", "eval.at_start=false", "run.save_at_end=false",
                 "run.progress_bar=false", "launch.nproc_per_node=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    # every run in fresh processes (a run late in a long-lived process measured slower), the modes
    # alternating round by round so that a drift in machine load hits them alike
    pooled: dict = {}
    for rnd in range(args.tp2_rounds):
        for mode in TP2_MODES:
            run_out = out / f"round{rnd}_{mode}"
            run_out.mkdir()
            spec = run_out / "spec.json"
            spec.write_text(json.dumps({"modes": [mode], "overrides": overrides, "out": str(run_out)}))
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                   "2", str(Path(__file__).resolve()), "--tp2-worker", str(spec)], env=env, cwd=REPO)
            if proc.returncode:
                raise RuntimeError(f"TP=2 benchmark worker ({mode}) failed with exit code {proc.returncode}")
            res = json.loads((run_out / "tp2.json").read_text())[mode]
            tokens_per_step = res["tokens_per_s"] * res["step_s"]
            times = pooled.get(mode, {}).get("times", []) + res["times"]
            cpu = pooled.get(mode, {}).get("cpu", []) + res["cpu"]
            step_s = statistics.median(times)
            pooled[mode] = {**res, "times": times, "cpu": cpu, "step_s": step_s,
                            "tokens_per_s": tokens_per_step / step_s,
                            "user_s": statistics.median(u for u, _ in cpu),
                            "sys_s": statistics.median(s for _, s in cpu)}
    return pooled


def print_tp2(res: dict, args) -> None:
    print(f"\n## TP=2 communication: 60m shape (seq {args.tp2_seq}), 2 gloo ranks, micro 1 x GA 4, ZeRO-1, "
          f"{args.tp2_rounds} round(s) of {args.tp2_steps} steps per run, each run in fresh processes, modes "
          f"alternating (median step time over the rounds, each run's first step left out; rank 0's user and "
          f"system CPU seconds per step, median: user time is the compute, which steal time on a shared host does "
          f"not inflate)")
    print("| run | step s | tokens/s | vs dense | user CPU s / step | user CPU, dense / run | system CPU s / step | "
          "TP grad all-reduces / step | TP grad MiB / step | TP activation+loss MiB / step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    dense, dense_user = res["dense"]["tokens_per_s"], res["dense"]["user_s"]
    for mode in TP2_MODES:
        r = res[mode]
        print(f"| {mode} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / dense:.3f} | "
              f"{r['user_s']:.3f} | {dense_user / r['user_s']:.3f} | {r['sys_s']:.3f} | "
              f"{r['grad_calls']:.0f} | {r['grad_bytes'] / 2**20:.2f} | {r['act_bytes'] / 2**20:.2f} |")


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--tp2-worker":
        return tp2_worker(sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "60m"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seq", type=int, default=None, help="override the presets' sequence length (256)")
    p.add_argument("--zero", type=int, default=1)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--memory-preset", default="130m")
    p.add_argument("--memory-micro", type=int, default=2)
    p.add_argument("--memory-steps", type=int, default=2)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-throughput", action="store_true")
    p.add_argument("--tp2", action="store_true", help="part 3: TP=2 communication, before/after, SL vs dense")
    p.add_argument("--tp2-steps", type=int, default=6)
    p.add_argument("--tp2-seq", type=int, default=256)
    p.add_argument("--tp2-rounds", type=int, default=1, help="runs per mode, alternating; step times are pooled")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="sl", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.micro = {"tiny": 8, "60m": 4, "130m": 2}

    from megatron_sl.training.distributed import resolve_device, silence_known_warnings

    silence_known_warnings()
    device = resolve_device(args.device)
    if args.memory_child:
        print("MEMORY " + json.dumps(memory_child(args, device)), flush=True)
        return 0
    import torch

    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {os.cpu_count()} cores, fp32"
    rows, mem = [], []
    if not args.no_throughput:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
        rows = throughput(args, device)
    if not args.no_memory:
        mem = memory(args, device)
    print_tables(name, rows, mem)
    comm = tp2(args) if args.tp2 else None
    if comm:
        print_tp2(comm, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "throughput": rows, "memory": mem, "tp2": comm},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
