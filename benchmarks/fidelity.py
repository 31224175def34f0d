"""Fidelity study: does SL reach full-rank perplexity at the same tokens, and low-rank not?

The paper's claim (arXiv 2406.02214, Table 2, LLaMA 60M on C4: full rank 34.06, SLTrain 34.15,
low-rank 78.18 validation perplexity) at a scale this machine can train: three variants of one
LLaMA shape on the demo corpus, trained by ``megatron-sl train`` itself (1 rank, ZeRO-0 AdamW, fp32):

* ``dense``: full-rank linears;
* ``lowrank``: W = s·BA (δ = 0), the same r;
* ``sl``: W = s·BA + S, δ = 0.03.

Shape: hidden 384, ffn 1024, 6 heads, 6 layers, sequence 256, vocab 8000 (the demo BPE), r = 96
(d/4, the paper's r/d at 60M), α = 24 (s = α/r = 0.25, the paper's 60M scale). The linear layers
hold 63 % of the full-rank model's parameters. Every variant sees the same batches in the same order
(same data seed), the same number of tokens and the same schedule (linear warmup 10 %, cosine to
10 %, AdamW β = (0.9, 0.95), no weight decay, clipping 1.0). The paper gives a learning rate only
for SLTrain (3e-3, every size), so the learning rate is a small sweep, the same grid for all three
(``--lrs``), pruned by successive halving with one rule for every variant (``--halve-at``: once all
runs of a variant have evaluated at that step, only its lowest-perplexity learning rate continues).
No variant is tuned alone and there is one seed. The comparison table is taken at equal tokens: the
last evaluation every variant's surviving run has reached.

Runs are resumable: each is an ordinary run directory under ``--out`` (checkpoints every
``--save-interval`` steps). ``--hours`` stops every run with SIGUSR1 at the deadline (each writes a
checkpoint and exits 75); rerunning the same command continues them. The runs go concurrently, one
thread each, niced, so that at any moment all variants have seen about the same number of tokens.

Outputs in ``--results`` (default ``benchmarks/results``): ``fidelity.png`` (validation perplexity vs
tokens, every run), ``fidelity.md`` (the table) and ``fidelity.json`` (every evaluation).

    python benchmarks/fidelity.py                      # the study (~2 h of this 2-core CPU machine)
    python benchmarks/fidelity.py --hours 0.5          # a piece; rerun to continue
    python benchmarks/fidelity.py --report-only        # table and plot from what has run so far
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(REPO))
from benchmarks import suite  # noqa: E402
VARIANTS = ("dense", "lowrank", "sl")
PAPER_60M = {"dense": 34.06, "sl": 34.15, "lowrank": 78.18}  # Table 2 of the paper, C4, 1.1B tokens

SHAPE = {"num_layers": 6, "hidden_size": 384, "ffn_hidden_size": 1024,
         "num_attention_heads": 6, "num_query_groups": 6, "seq_length": 256}
SL = {"rank": 96, "density": 0.03, "alpha": 24.0, "seed": 0}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/fidelity", help="where the run directories live")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"), help="where the table and plot go")
    p.add_argument("--data-dir", default="data", help="demo corpus cache (as `megatron-sl demo --data-dir`)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--lrs", default="1e-3,3e-3", help="learning-rate grid, the same for every variant")
    p.add_argument("--iters", type=int, default=160, help="optimizer steps per run (the schedule's length)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=16, help="sequences of 256 tokens per step")
    p.add_argument("--eval-interval", type=int, default=20)
    p.add_argument("--eval-iters", type=int, default=12, help="validation micro-batches per evaluation")
    p.add_argument("--save-interval", type=int, default=20)
    p.add_argument("--halve-at", type=int, default=60,
                   help="successive halving over the lr grid at this step (0: off); the same rule for every variant")
    p.add_argument("--hours", type=float, default=0.0, help="stop (resumably) after this long; 0 = run to the end")
    p.add_argument("--nice", type=int, default=10, help="niceness of the runs (they share the machine)")
    p.add_argument("--report-only", action="store_true", help="only write the table and plot")
    return p


def run_name(variant: str, lr: float) -> str:
    return f"{variant}_lr{lr:g}"


def run_config(args, variant: str, lr: float, data) -> dict:
    """The whole training config of one run (every key spelled out; nothing inherited)."""
    return {
        "model": {"preset": "tiny", "variant": variant, **SHAPE},
        # lowrank means δ = 0: the variant sets it, and an explicit 0.03 would contradict it
        "sl": {k: v for k, v in SL.items() if variant == "sl" or k != "density"},
        "data": {"prefix": str(data.prefix), "tokenizer": str(data.tokenizer_model), "split": "95,5,0"},
        "train": {"micro_batch_size": args.micro_batch, "global_batch_size": args.global_batch,
                  "train_iters": args.iters, "seed": 1234, "precision": "fp32"},
        "optim": {"name": "adamw", "lr": lr, "beta2": 0.95, "min_lr_ratio": 0.1, "weight_decay": 0.0,
                  "clip_grad": 1.0},
        "deepspeed": {"zero_stage": 0},
        "eval": {"interval": args.eval_interval, "iters": args.eval_iters, "at_start": True},
        "run": {"output_dir": str(Path(args.out).resolve() / run_name(variant, lr)), "save_interval": args.save_interval,
                "keep_last": 1, "log_interval": 5, "progress_bar": False},
        "launch": {"nproc_per_node": 1},
    }


def prepare(args):
    from megatron_sl.corpus import prepare_demo_data

    return prepare_demo_data(args.data_dir, vocab_size=8000)


def finished(run_dir: Path, iters: int) -> bool:
    summary = run_dir / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("steps", 0) >= iters


def ppl_at(run_dir: Path, step: int):
    return next((e["val_ppl"] for e in read_run(run_dir)["evals"] if e["step"] == step), None)


def halved(runs: dict, halve_at: int) -> set:
    """Runs stopped by successive halving: per variant, once every run of it (one per learning
    rate) has its evaluation at step ``halve_at``, all but the one with the lowest perplexity there.
    The rule is the same for every variant, so no variant is tuned alone."""
    out = set()
    if not halve_at:
        return out
    by_variant = {}
    for name, cfg in runs.items():
        by_variant.setdefault(cfg["model"]["variant"], []).append(name)
    for names in by_variant.values():
        ppl = {n: ppl_at(Path(runs[n]["run"]["output_dir"]), halve_at) for n in names}
        if len(names) > 1 and all(v is not None for v in ppl.values()):
            best = min(names, key=ppl.get)
            out |= {n for n in names if n != best}
    return out


def train_all(args, runs) -> None:
    """Start every unfinished run (resuming where it stopped) that successive halving has not
    stopped, wait, stop the losers of the halving as it is decided, SIGUSR1 all at the deadline."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    procs = {}
    out = Path(args.out).resolve()  # the runs start in the repository root, whatever the caller's directory
    for name, cfg in runs.items():
        run_dir = Path(cfg["run"]["output_dir"])
        if finished(run_dir, cfg["train"]["train_iters"]) or name in halved(runs, args.halve_at):
            print(f"[fidelity] {name}: finished or stopped by successive halving earlier", flush=True)
            continue
        cfg_path = out / "configs" / f"{name}.yaml"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        log = open(out / f"{name}.log", "a")
        cmd = ["nice", "-n", str(args.nice), sys.executable, "-m", "megatron_sl.cli.main", "train",
               "--config", str(cfg_path)]
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO), log)
        print(f"[fidelity] {name}: started (log {out / f'{name}.log'})", flush=True)
    deadline = time.monotonic() + args.hours * 3600 if args.hours > 0 else None
    stopping = False
    cut = set()
    while any(p.poll() is None for p, _ in procs.values()):
        for name in halved(runs, args.halve_at) - cut:
            cut.add(name)
            if name in procs and procs[name][0].poll() is None:
                print(f"[fidelity] {name}: stopped by successive halving at step {args.halve_at}", flush=True)
                procs[name][0].send_signal(signal.SIGUSR1)  # checkpoint, exit 75
        if deadline is not None and not stopping and time.monotonic() > deadline:
            print("[fidelity] time is up: every run checkpoints and stops (rerun to continue)", flush=True)
            for p, _ in procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGUSR1)
            stopping = True
        time.sleep(15)
    for name, (p, log) in procs.items():
        log.close()
        state = {0: "finished", 75: "stopped, resumable"}.get(p.returncode, f"FAILED (exit {p.returncode})")
        print(f"[fidelity] {name}: {state}", flush=True)


def read_run(run_dir: Path) -> dict:
    evals, info, steps, summary = {}, {}, 0, {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a stop
                continue
            kind = rec.get("kind")
            if kind == "eval":
                evals[rec["step"]] = rec  # a resumed run may repeat a step: the last record wins
            elif kind == "run":
                info = rec
            elif kind == "train":
                steps = max(steps, rec["step"])
            elif kind == "summary":
                summary = rec
    return {"evals": [evals[k] for k in sorted(evals)], "info": info, "steps": steps, "summary": summary}


def report(args, runs) -> Path:
    """fidelity.json / .md / .png from the run directories as they are now."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    rows = []
    cut = halved(runs, args.halve_at)
    for name, cfg in runs.items():
        r = read_run(Path(cfg["run"]["output_dir"]))
        tps = r["info"].get("tokens_per_step", args.global_batch * SHAPE["seq_length"])
        last = r["evals"][-1] if r["evals"] else None
        planned = cfg["train"]["train_iters"]
        status = ("finished" if r["steps"] >= planned else
                  f"stopped by successive halving at step {args.halve_at}" if name in cut else "in progress")
        rows.append({"run": name, "variant": cfg["model"]["variant"], "lr": cfg["optim"]["lr"],
                     "params": r["info"].get("params"),
                     "linear_params": r["info"]["params"] - _non_linear(r["info"]) if r["info"] else None,
                     "steps": r["steps"], "planned_steps": planned, "status": status, "tokens_per_step": tps,
                     "tokens": (last["step"] if last else 0) * tps, "val_ppl": last["val_ppl"] if last else None,
                     "evals": {e["step"]: e["val_ppl"] for e in r["evals"]},
                     "curve": [(e["step"] * tps, e["val_ppl"]) for e in r["evals"]]})
    # per variant: the run the halving kept (before it is decided: the lowest last perplexity)
    best = {}
    for row in rows:
        if row["val_ppl"] is None or row["run"] in cut:
            continue
        cur = best.get(row["variant"])
        if cur is None or row["val_ppl"] < cur["val_ppl"]:
            best[row["variant"]] = row
    # compare at equal tokens: the last evaluation step every variant's kept run has reached
    common = min((max(b["evals"]) for b in best.values()), default=None)
    machine = f"{suite.machine()['device']}, 1 thread per run"
    (results / "fidelity.json").write_text(json.dumps({"machine": machine, "shape": SHAPE, "sl": SL,
                                                       "halve_at": args.halve_at, "rows": rows}, indent=1))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = {"dense": "tab:blue", "lowrank": "tab:red", "sl": "tab:green"}
    for row in rows:
        if row["curve"]:
            xs, ys = zip(*row["curve"][1:] or row["curve"])  # skip step 0 (ppl ≈ vocab) so the scale shows the gaps
            ax.plot([x / 1e6 for x in xs], ys, marker=".", color=colors.get(row["variant"]),
                    linestyle="-" if best.get(row["variant"]) is row else ":", label=f"{row['variant']} lr {row['lr']:g}")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"Fidelity: full-rank vs low-rank vs SL (hidden {SHAPE['hidden_size']}, {SHAPE['num_layers']} layers; "
                 f"dotted: lr stopped by halving)\n{machine}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(results / "fidelity.png", dpi=120)
    plt.close(fig)

    lines = [f"## Fidelity runs ({machine})", "",
             f"Shape: hidden {SHAPE['hidden_size']}, ffn {SHAPE['ffn_hidden_size']}, {SHAPE['num_layers']} layers, "
             f"seq {SHAPE['seq_length']}, vocab 8000; r={SL['rank']}, δ={SL['density']} (SL), α={SL['alpha']:g}; "
             f"{args.global_batch} sequences per step; lr grid {sorted({r['lr'] for r in rows})} for every variant, "
             f"successive halving at step {args.halve_at}.", "",
             "| variant | lr | parameters | linear-layer parameters | steps / planned | tokens | validation ppl | status |",
             "|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (VARIANTS.index(r["variant"]), r["lr"])):
        ppl = f"{row['val_ppl']:.2f}" if row["val_ppl"] is not None else "–"
        lines.append(f"| {row['variant']} | {row['lr']:g} | {_m(row['params'])} | {_m(row['linear_params'])} | "
                     f"{row['steps']} / {row['planned_steps']} | {row['tokens'] / 1e6:.2f} M | {ppl} | {row['status']} |")
    ref = best.get("dense")
    if common is not None and ref is not None:
        lines += ["", f"## Fidelity at equal tokens ({machine})", "",
                  "| variant | lr | tokens | validation ppl | ppl / full-rank | paper, LLaMA 60M on C4 (1.1 B tokens) |",
                  "|---|---|---|---|---|---|"]
        for v in VARIANTS:
            if v in best:
                b = best[v]
                lines.append(f"| {v} | {b['lr']:g} | {common * b['tokens_per_step'] / 1e6:.2f} M | "
                             f"{b['evals'][common]:.2f} | {b['evals'][common] / ref['evals'][common]:.3f} | "
                             f"{PAPER_60M[v]} ({PAPER_60M[v] / PAPER_60M['dense']:.3f}) |")
    (results / "fidelity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return results / "fidelity.md"


def _non_linear(info: dict) -> int:
    """Parameters outside the linear layers, the same in every variant: the untied embedding and
    output layer (vocab·h each) and the RMSNorm weights (2 per layer + the final one)."""
    v, h, n = info.get("vocab_size", 0), SHAPE["hidden_size"], SHAPE["num_layers"]
    return 2 * v * h + (2 * n + 1) * h


def _m(n) -> str:
    return f"{n / 1e6:.2f} M" if n else "–"


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    lrs = [float(x) for x in args.lrs.split(",") if x]
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if args.halve_at % args.eval_interval:
        print(f"fidelity: error: --halve-at={args.halve_at} is not a multiple of --eval-interval={args.eval_interval}",
              file=sys.stderr)
        return 2
    if bad or not lrs:
        print(f"fidelity: error: variants {bad} not in {list(VARIANTS)}" if bad else "fidelity: error: empty --lrs",
              file=sys.stderr)
        return 2
    data = prepare(args)
    runs = {run_name(v, lr): run_config(args, v, lr, data) for v in variants for lr in lrs}
    if not args.report_only:
        train_all(args, runs)
    report(args, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
