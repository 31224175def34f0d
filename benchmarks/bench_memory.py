"""The memory planner against measured peaks of real training runs on this machine.

Each case is a short real training (``megatron_sl.training.trainer.Trainer``, exactly what
``megatron-sl train`` runs inside a rank: DeepSpeed ZeRO or per-layer updates, AdamW / 8-bit AdamW,
TP x DP over 2 gloo ranks) on a small prepared corpus. A ``memtrack.LiveTensorTracker`` is entered
before the trainer builds anything, so parameters, gradients, optimizer states, DeepSpeed buffers,
activations and temporaries are all counted; the measured figure is each rank's peak of live tensor
bytes (what ``torch.cuda.max_memory_allocated`` reports on a GPU). The prediction is
``megatron_sl.training.memory_plan`` for the same config on the CPU device. Printed: one row per
case and rank with predicted, measured and the error, plus the phase each peak fell in.

    python benchmarks/bench_memory.py                      # every case (~10 min on 2 cores)
    python benchmarks/bench_memory.py --cases tiny-sl-z1 60m-dense-z0 --json out.json

All cases run in one 2-rank torchrun launch (imports amortised). Sequence and micro-batch are shrunk
for the 60m/130m presets so a case takes seconds; eval and checkpoints are off.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BASE_CONFIG = REPO / "configs" / "tiny_sl.yaml"
PAPER_VOCAB = "model.vocab_size=32000"
SMALL_BUCKET = "deepspeed.extra.zero_optimization.reduce_bucket_size=2000000"   # else 200 MB dominates

# name -> overrides on top of configs/tiny_sl.yaml (2 ranks; fp32 on CPU)
CASES = {
    "tiny-sl-z0-adamw": ["deepspeed.zero_stage=0", "model.seq_length=128", "train.micro_batch_size=2"],
    "tiny-sl-z1-adamw8bit": ["deepspeed.zero_stage=1", "optim.name=adamw8bit", "model.seq_length=128",
                             "train.micro_batch_size=2"],
    "tiny-dense-z2-adamw-tp2": ["model.variant=dense", "deepspeed.zero_stage=2", SMALL_BUCKET,
                                "parallel.tensor_parallel=2", "model.seq_length=128", "train.micro_batch_size=2",
                                "train.global_batch_size=4"],
    "tiny-sl-perlayer-adamw8bit": ["optim.per_layer=true", "deepspeed.zero_stage=0", "optim.name=adamw8bit",
                                   "optim.clip_grad=0", "model.seq_length=128", "train.micro_batch_size=2"],
    "60m-sl-z0-adamw-tp2": ["model.preset=60m", PAPER_VOCAB, "deepspeed.zero_stage=0", "parallel.tensor_parallel=2",
                            "model.seq_length=64", "train.micro_batch_size=2", "train.global_batch_size=2"],
    "60m-dense-z1-adamw": ["model.preset=60m", PAPER_VOCAB, "model.variant=dense", "deepspeed.zero_stage=1",
                           SMALL_BUCKET, "model.seq_length=64", "train.micro_batch_size=2",
                           "train.global_batch_size=4"],
    "60m-sl-perlayer-adamw-clip": ["model.preset=60m", PAPER_VOCAB, "optim.per_layer=true", "deepspeed.zero_stage=0",
                                   "model.seq_length=64", "train.micro_batch_size=2", "train.global_batch_size=4"],
    "130m-sl-z2-adamw8bit": ["model.preset=130m", PAPER_VOCAB, "deepspeed.zero_stage=2", "optim.name=adamw8bit",
                             SMALL_BUCKET,
                             "model.seq_length=64", "train.micro_batch_size=1", "train.global_batch_size=2"],
    "130m-dense-perlayer-adamw8bit": ["model.preset=130m", PAPER_VOCAB, "model.variant=dense", "optim.per_layer=true",
                                      "deepspeed.zero_stage=0", "optim.name=adamw8bit", "optim.clip_grad=0",
                                      "model.seq_length=64", "train.micro_batch_size=1", "train.global_batch_size=2"],
    "tiny-sl-perlayer-bf16-adamw8bit": ["optim.per_layer=true", "deepspeed.zero_stage=0", "optim.name=adamw8bit",
                                        "train.precision=bf16", "optim.clip_grad=0", "model.seq_length=128",
                                        "train.micro_batch_size=2"],
    "tiny-sl-z0-selective-recompute": ["deepspeed.zero_stage=0", "model.seq_length=128", "train.micro_batch_size=2",
                                       "model.recompute=selective"],
    "60m-sl-z1-bf16-adamw": ["model.preset=60m", PAPER_VOCAB, "deepspeed.zero_stage=1", "train.precision=bf16",
                             SMALL_BUCKET, "model.seq_length=64", "train.micro_batch_size=2",
                             "train.global_batch_size=4"],
    "130m-sl-perlayer-bf16-adamw8bit": ["model.preset=130m", PAPER_VOCAB, "optim.per_layer=true",
                                        "deepspeed.zero_stage=0", "optim.name=adamw8bit", "train.precision=bf16",
                                        "optim.clip_grad=0", "model.seq_length=64", "train.micro_batch_size=1",
                                        "train.global_batch_size=2"],
    "tiny-sl-z0-full-recompute": ["deepspeed.zero_stage=0", "model.seq_length=128", "train.micro_batch_size=2",
                                  "model.recompute=full"],
}
WORLD = 2


def case_overrides(name: str, data, out_dir: Path, steps: int) -> list:
    prefix, tokenizer = data
    return [*CASES[name], f"data.prefix={prefix}", f"data.tokenizer={tokenizer}", f"run.output_dir={out_dir / name}",
            "run.progress_bar=false", "run.save_at_end=false", "eval.iters=0", "eval.at_start=false",
            f"train.train_iters={steps}", "optim.warmup_iters=0", "launch.device=cpu"]


def predict(overrides: list, world: int = WORLD) -> list:
    """Per-rank planner figures for a case: [{'rank', 'peak', 'phase', 'components'}]."""
    from megatron_sl.training.config import load_config
    from megatron_sl.training.memory_plan import plan_ranks
    from megatron_sl.training.config_checks import make_plan

    cfg = load_config(BASE_CONFIG, overrides)
    plan = make_plan(cfg, world, check_outputs=False)
    return [{"rank": r.rank, "peak": r.peak, "phase": r.peak_phase, "phases": r.phases, "components": r.components}
            for r in plan_ranks(cfg, plan, device="cpu")]


def measure_case(overrides: list) -> dict:
    """Run one case in this rank under the live-tensor tracker; returns this rank's figures."""
    import torch.distributed as dist

    from benchmarks.memtrack import LiveTensorTracker
    from megatron_sl.training.batches import collate, masked_mean, per_token_loss, train_sample_start
    from megatron_sl.training.config import load_config
    from megatron_sl.training.trainer import Trainer
    from megatron_sl.training.config_checks import make_plan

    cfg = load_config(BASE_CONFIG, overrides)
    plan = make_plan(cfg, dist.get_world_size() if dist.is_initialized() else WORLD, check_outputs=False)
    gc.collect()
    tracker = LiveTensorTracker()
    with tracker:
        trainer = Trainer(cfg, plan)
        tracker.mark("setup")
        p = plan
        losses = []
        for step in range(cfg.train.train_iters):
            for m in range(p.grad_accum):
                start = train_sample_start(step, m, p.global_batch_size, p.micro_batch_size, p.dp, trainer.dp_rank)
                batch = collate(trainer.train_ds, start, p.micro_batch_size, trainer.tdev)
                loss = masked_mean(per_token_loss(trainer.engine, batch), batch["loss_mask"])
                tracker.mark("forward")
                trainer.engine.backward(loss)
                tracker.mark("backward")
                trainer.engine.step()
                tracker.mark("step")
                losses.append(float(loss))
                del loss, batch
        phases = {}
        for label, _, peak in tracker.phases:
            phases[label] = max(phases.get(label, 0), peak)
        result = {"rank": dist.get_rank(), "peak": tracker.peak, "phases": phases, "losses": losses,
                  "peak_phase": max(phases, key=phases.get)}
        del trainer
    gc.collect()
    return result


def worker(spec_path: str, out_path: str) -> int:
    import torch.distributed as dist

    from megatron_sl.training.distributed import silence_known_warnings

    silence_known_warnings()
    spec = json.loads(Path(spec_path).read_text())
    results = {}
    for name, overrides in spec.items():
        try:
            res = measure_case(overrides)
        except Exception as e:  # noqa: BLE001 -- reported per case
            import traceback

            res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, res)
        results[name] = gathered
        if dist.get_rank() == 0:
            Path(out_path).write_text(json.dumps(results, indent=1))
    dist.barrier()
    return 0


def run_cases(names, data, steps: int = 2, workdir=None, timeout: int = 3000) -> dict:
    """Measure and predict ``names``; returns {name: [per-rank {'predicted', 'measured', 'error', ...}]}."""
    from megatron_sl.training.launch import rank_environment

    work = Path(workdir or tempfile.mkdtemp(prefix="bench_memory_"))
    spec = {n: case_overrides(n, data, work / "runs", steps) for n in names}
    (work / "spec.json").write_text(json.dumps(spec))
    out = work / "measured.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           str(Path(__file__).resolve()), "--worker", str(work / "spec.json"), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=rank_environment(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"measurement run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    measured = json.loads(out.read_text())
    table = {}
    for name in names:
        pred = predict(spec[name])
        rows = []
        for r, meas in enumerate(measured[name]):
            if "error" in meas:
                rows.append({"rank": r, "error_msg": meas["error"], "traceback": meas.get("traceback")})
                continue
            pr = pred[r]
            rows.append({"rank": r, "predicted": pr["peak"], "measured": meas["peak"],
                         "error": (pr["peak"] - meas["peak"]) / meas["peak"], "predicted_phase": pr["phase"],
                         "measured_phase": meas["peak_phase"], "predicted_phases": pr["phases"],
                         "measured_phases": meas["phases"], "components": pr["components"],
                         "losses": meas["losses"]})
        table[name] = rows
    return table


def prepare_data(cache: Path):
    from megatron_sl.corpus import prepare_demo_data

    prepared = prepare_demo_data(cache, vocab_size=512, sources=("pydoc",))
    return str(prepared.prefix), str(prepared.tokenizer_model)


def format_table(table: dict) -> str:
    """The comparison as a markdown table (``python -m benchmarks`` collects it into RESULTS.md)."""
    mib = 2**20
    lines = ["## Memory planner vs measured peak of live tensor bytes (CPU, 2 gloo ranks)", "",
             "| case | rank | predicted MiB | measured MiB | error | phase (predicted / measured) |",
             "|---|---:|---:|---:|---:|---|"]
    for name, rows in table.items():
        for r in rows:
            if "error_msg" in r:
                lines.append(f"| {name} | {r['rank']} | FAILED: {r['error_msg']} | | | |")
                continue
            lines.append(f"| {name} | {r['rank']} | {r['predicted'] / mib:.1f} | {r['measured'] / mib:.1f} | "
                         f"{100 * r['error']:.1f}% | {r['predicted_phase']} / {r['measured_phase']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", default=list(CASES), help=f"subset of: {', '.join(CASES)}")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per case (the 2nd has all states)")
    ap.add_argument("--workdir", default=None, help="keep data, runs and raw measurements here")
    ap.add_argument("--json", default=None, help="also write the table as JSON")
    ap.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        print(f"bench_memory: unknown case(s) {unknown}; known: {', '.join(CASES)}", file=sys.stderr)
        return 2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(work / "data")
    table = run_cases(args.cases, data, steps=args.steps, workdir=work)
    print(format_table(table))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))
    worst = max(abs(r["error"]) for rows in table.values() for r in rows if "error" in r)
    print(f"worst |error| {100 * worst:.1f}%")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
