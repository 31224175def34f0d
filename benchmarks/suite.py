"""The benchmark suite: run every benchmark, keep raw rows, render ``benchmarks/RESULTS.md``.

``python -m benchmarks`` runs the layer, kernel, training-step (1 rank; TP=2 communication) and memory
benchmarks (and, with ``--fidelity``, the fidelity study, about 2 hours on a 2-core CPU), each as its
own process with its usual command line. Every markdown table a benchmark prints is split into rows;
each row is appended to ``benchmarks/results/results.csv`` with the run id, the git commit and the
machine (device kind and name, CPU model, cores, torch). ``RESULTS.md`` is then rendered from the
CSV alone: per benchmark, the newest run on a CPU and the newest on a GPU, every table labelled with
the device it ran on (a device kind with no run on record says so), plus the plots the benchmarks
write into ``benchmarks/results`` (the fidelity study's ``fidelity.png``).

    python -m benchmarks                        # everything but the fidelity study (CPU: ~40 min)
    python -m benchmarks --only layer kernels   # a subset
    python -m benchmarks --quick                # fewer repetitions (a quick look, noisier)
    python -m benchmarks --fidelity             # also run (or continue) the fidelity study
    python -m benchmarks --render               # only re-render RESULTS.md from results.csv
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
CSV_PATH = RESULTS_DIR / "results.csv"
RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"
CSV_FIELDS = ("run_id", "time", "commit", "device_kind", "device", "cpu", "cores", "load", "torch", "bench",
              "table", "row")

# name -> (script, arguments, --quick arguments, what it measures)
BENCHES = {
    "layer": ("bench_sl_linear.py", [], ["--reps", "3"],
              "one SL linear, forward + backward: time and memory vs dense nn.Linear and the paper-style layer"),
    "kernels": ("bench_kernels.py", [], ["--reps", "3", "--tokens", "512"],
                "each primitive and execution path vs dense (Triton kernels timed on GPU only)"),
    "train": ("bench_train.py", [], ["--rounds", "3", "--presets", "tiny"],
              "whole training steps (1 rank, ZeRO-1): SL vs low-rank vs dense tokens/s; peak memory"),
    "train-tp2": ("bench_train.py", ["--tp2", "--no-throughput", "--no-memory", "--tp2-rounds", "4"],
                  ["--tp2", "--no-throughput", "--no-memory", "--tp2-steps", "4"],
                  "TP=2 on 2 gloo ranks, GA=4: step time and bytes all-reduced, SL before/after vs dense"),
    "memory": ("bench_memory.py", [], [], "the memory planner's prediction vs measured peaks of real runs"),
    "fidelity": ("fidelity.py", [], [],
                 "validation perplexity at equal tokens: full-rank vs low-rank vs SL (the paper's Table 2 claim)"),
}
DEFAULT = tuple(b for b in BENCHES if b != "fidelity")


def machine() -> dict:
    """Where the numbers come from; every CSV row carries it."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.is_available()
    return {"device_kind": "GPU" if gpu else "CPU",
            "device": torch.cuda.get_device_name() if gpu else f"CPU: {cpu}, {os.cpu_count()} cores",
            "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "load": load_average()}


def load_average() -> str:
    """The 1-minute load average when a benchmark starts: CPU timings on a busy machine are noisy."""
    return f"{os.getloadavg()[0]:.1f}"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parse_tables(text: str) -> list:
    """Every markdown table in a benchmark's output: ``[(heading, [row dict, ...]), ...]``; the
    heading is the nearest ``#`` line above the table (or the table's first column name)."""
    tables, heading, lines = [], "", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.startswith("|") and i + 1 < len(lines) and set(lines[i + 1].strip()) <= set("|-: ") \
                and lines[i + 1].strip().startswith("|"):
            header = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                rows.append(dict(zip(header, cells + [""] * (len(header) - len(cells)))))
                i += 1
            title = heading or header[0]
            seen = sum(1 for t, _ in tables if t == title or t.startswith(title + " ("))
            tables.append((f"{title} ({seen + 1})" if seen else title, rows))
            continue
        i += 1
    return tables


def run_bench(name: str, quick: bool, extra: list) -> str:
    script, args, quick_args, _ = BENCHES[name]
    cmd = [sys.executable, str(REPO / "benchmarks" / script)] + (quick_args if quick else args) + extra
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    print(f"[bench] {name}: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark {name!r} failed with exit code {proc.returncode}")
    return proc.stdout


def append_rows(name: str, output: str, info: dict, run_id: str, rev: str, csv_path: Path = CSV_PATH) -> int:
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new = not csv_path.exists()
    n = 0
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        for heading, rows in parse_tables(output):
            for row in rows:
                w.writerow({"run_id": run_id, "time": run_id, "commit": rev, "bench": name, "table": heading,
                            "row": json.dumps(row, ensure_ascii=False),
                            **{k: info[k] for k in ("device_kind", "device", "cpu", "cores", "load", "torch")}})
                n += 1
    return n


def read_rows(csv_path: Path = CSV_PATH) -> list:
    if not csv_path.exists():
        return []
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def _table_md(rows: list) -> list:
    header = list(json.loads(rows[0]["row"]))
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = json.loads(r["row"])
        out.append("| " + " | ".join(str(cells.get(h, "")) for h in header) + " |")
    return out


def headline(rows: list) -> list:
    """One line per benchmark with the figure a reader asks first, from the newest CPU/GPU rows."""
    out = []

    def rows_of(bench, kind):
        got = [r for r in rows if r["bench"] == bench and r["device_kind"] == kind]
        last = max((r["run_id"] for r in got), default=None)
        return [json.loads(r["row"]) | {"_table": r["table"]} for r in got if r["run_id"] == last]

    for kind in ("CPU", "GPU"):
        for r in rows_of("fidelity", kind):
            if r["_table"].startswith("Fidelity at equal tokens"):
                out.append(f"- {kind} fidelity: {r['variant']} validation ppl {r['validation ppl']} = "
                           f"{r['ppl / full-rank']}× full-rank at {r['tokens']} tokens (paper, 60M: "
                           f"{r['paper, LLaMA 60M on C4 (1.1 B tokens)']})")
        train = [r for r in rows_of("train", kind) if r.get("variant") == "sl" and "preset" in r and "vs dense" in r]
        for r in train:
            out.append(f"- {kind} training step, {r['preset']}: SL tokens/s = {r['vs dense']} dense "
                       f"({r['tokens/s']} tokens/s)")
        tp2 = {r.get("run"): r for r in rows_of("train-tp2", kind)}
        if "sl_after" in tp2 and "dense" in tp2:
            sl, dense = tp2["sl_after"], tp2["dense"]
            compute = sl.get("user CPU, dense / run")  # wall time also carries steal and page-fault time
            saved = tp2.get("sl_save_xa")
            out.append(f"- {kind} TP=2, GA=4: SL tokens/s = {sl['vs dense']}× dense"
                       + (f" (compute, dense user CPU / SL user CPU per step: {compute}×)" if compute else "")
                       + (f"; with sl.save_xa {saved['vs dense']}× ({saved.get('user CPU, dense / run')}× by "
                          "compute)" if saved else "")
                       + f"; TP gradient-like all-reduces per step: SL {sl['TP grad all-reduces / step']}, "
                       f"dense {dense['TP grad all-reduces / step']}")
        mem = [r for r in rows_of("memory", kind) if r.get("error", "").endswith("%")]
        if mem:
            worst = max(mem, key=lambda r: abs(float(r["error"].rstrip("%"))))
            out.append(f"- {kind} memory planner: worst error {worst['error']} ({worst['case']}, "
                       f"{len(mem)} rank measurements)")
    return out


def render(csv_path: Path = CSV_PATH, out: Path = RESULTS_MD) -> Path:
    """RESULTS.md from results.csv (and the plots beside it)."""
    rows = read_rows(csv_path)
    plots_dir = csv_path.parent
    md = ["# Benchmark results", "",
          "Rendered by `python -m benchmarks` from `benchmarks/results/results.csv` (raw rows: run id, git commit, "
          "machine). For each benchmark the newest run per device kind is shown; every table names the device "
          "it ran on. CPU figures measure this project's CPU paths (the torch references), not GPU behaviour; "
          "GPU sections stay empty until a GPU run is on record.", ""]
    md += ["## Headline", ""] + (headline(rows) or ["- nothing measured yet"]) + [""]
    for name, (script, _, _, what) in BENCHES.items():
        md += [f"## {name}: {what}", "", f"`python benchmarks/{script}` (or `python -m benchmarks --only {name}`)", ""]
        for kind in ("CPU", "GPU"):
            got = [r for r in rows if r["bench"] == name and r["device_kind"] == kind]
            if not got:
                md += [f"**{kind}**: not measured yet.", ""]
                continue
            last = max(r["run_id"] for r in got)
            got = [r for r in got if r["run_id"] == last]
            md += [f"**{kind}** — {got[0]['device']}; torch {got[0]['torch']}; run {last}, commit {got[0]['commit']}, "
                   f"load average {got[0].get('load', '?')} at start", ""]
            tables = {}
            for r in got:
                tables.setdefault(r["table"], []).append(r)
            for heading, trows in tables.items():
                md += [f"*{heading}* ({kind})", ""] + _table_md(trows) + [""]
        for plot in sorted(plots_dir.glob(f"{name}*.png")) if plots_dir.exists() else []:
            md += [f"![{plot.stem}]({os.path.relpath(plot, out.parent)})", ""]
    out.write_text("\n".join(md))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", default=None, help=f"benchmarks to run: {', '.join(BENCHES)}")
    p.add_argument("--fidelity", action="store_true", help="also run (or continue) the fidelity study (~2 h CPU)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions: a quick look, noisier")
    p.add_argument("--render", action="store_true", help="only render RESULTS.md from results.csv")
    args = p.parse_args(argv)
    names = list(args.only or DEFAULT) + (["fidelity"] if args.fidelity and not args.only else [])
    bad = [n for n in names if n not in BENCHES]
    if bad:
        print(f"python -m benchmarks: error: unknown benchmark(s) {bad}; known: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    if not args.render:
        info, rev = machine(), commit()
        run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        failed = []
        for name in names:
            try:
                info["load"] = load_average()
                out = run_bench(name, args.quick, [])
            except RuntimeError as e:
                print(f"[bench] {e}", file=sys.stderr, flush=True)
                failed.append(name)
                continue
            print(f"[bench] {name}: {append_rows(name, out, info, run_id, rev)} rows -> {CSV_PATH}", flush=True)
        if failed:
            print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
    print(f"[bench] {render()}", flush=True)
    return 0 if args.render or not failed else 1


if __name__ == "__main__":
    sys.exit(main())
