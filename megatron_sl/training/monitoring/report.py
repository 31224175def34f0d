"""The offline run report: PNG plots and an HTML summary from one or more run directories.

``write_report(run_dirs, out_dir)`` reads each run's ``metrics.jsonl`` (train / eval / run /
checkpoint records), ``summary.json`` and ``config.yaml`` and writes into ``out_dir``:

* ``loss.png``: training loss and validation perplexity against step;
* ``lr.png``: learning rate;
* ``throughput.png``: global tokens/s and MFU (SL FLOPs solid, dense-equivalent dashed);
* ``memory.png``: per-rank memory (CUDA max allocated or peak RSS);
* ``step_time.png``: mean step time per run split into data, forward+backward, optimizer,
  checkpoint and the rest;
* ``index.html``: per run its config, parameter split, final figures, and the plots.

Runs are overlaid in every plot (e.g. sl vs dense vs lowrank), labelled by run directory name.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import List, Optional

PHASES = ("data", "forward_backward", "optimizer", "checkpoint")


class ReportError(ValueError):
    """A run directory the report cannot read; the message names it."""


class Run:
    def __init__(self, path: Path):
        self.path = Path(path)
        metrics = self.path / "metrics.jsonl"
        if not self.path.is_dir():
            raise ReportError(f"run directory {str(path)!r} does not exist or is not a directory")
        if not metrics.is_file():
            raise ReportError(f"run directory {str(path)!r} has no metrics.jsonl (not a megatron-sl run directory?)")
        self.records = []
        lines = metrics.read_text().splitlines()
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                self.records.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines):  # only a killed run's last line may be cut short
                    raise ReportError(f"{metrics}: line {i} is not JSON") from None
        self.train = [r for r in self.records if r.get("kind") == "train"]
        self.evals = [r for r in self.records if r.get("kind") == "eval"]
        self.ckpts = [r for r in self.records if r.get("kind") == "checkpoint"]
        runs = [r for r in self.records if r.get("kind") == "run"]
        self.info = runs[-1] if runs else {}
        s = self.path / "summary.json"
        self.summary = json.loads(s.read_text()) if s.is_file() else {}
        c = self.path / "config.yaml"
        self.config = c.read_text() if c.is_file() else ""
        self.name = self.path.resolve().name
        variant = self.summary.get("variant") or self.info.get("variant")
        self.label = f"{self.name} ({variant})" if variant and variant not in self.name else self.name

    def series(self, key: str, records=None):
        recs = self.train if records is None else records
        pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    def final(self) -> dict:
        s, last = self.summary, (self.train[-1] if self.train else {})
        mfu = [r["mfu"] for r in self.train[1:] if r.get("mfu") is not None] or \
              [r["mfu"] for r in self.train if r.get("mfu") is not None]
        mfu_d = [r["mfu_dense_equivalent"] for r in self.train[1:] if r.get("mfu_dense_equivalent") is not None] or \
                [r["mfu_dense_equivalent"] for r in self.train if r.get("mfu_dense_equivalent") is not None]
        mem = [max(r["rank_memory_bytes"]) for r in self.train if r.get("rank_memory_bytes")]
        last_eval = self.evals[-1] if self.evals else {}
        return {
            "steps": s.get("steps", last.get("step")),
            "last train loss": s.get("last_loss", last.get("loss")),
            "final validation loss": s.get("final_val_loss", last_eval.get("val_loss")),
            "final validation perplexity": s.get("final_val_ppl", last_eval.get("val_ppl")),
            "tokens/s (after the first step)": s.get("tokens_per_s"),
            "MFU % of SL FLOPs (mean after the first step)": 100 * sum(mfu) / len(mfu) if mfu else None,
            "MFU % dense-equivalent (mean after the first step)": 100 * sum(mfu_d) / len(mfu_d) if mfu_d else None,
            "peak memory of any rank (MiB)": max(mem) / 2**20 if mem else None,
            "optimizer state (bytes/param)": s.get("opt_state_bytes_per_param"),
            "checkpoints saved": sum(1 for c in self.ckpts if c.get("ok")),
            "checkpoint": s.get("checkpoint"),
        }


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return html.escape(str(v))


def _plots(runs: List[Run], out: Path) -> List[str]:
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only, no display
    import matplotlib.pyplot as plt

    files = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for r in runs:
        a1.plot(*r.series("loss"), label=r.label)
        a2.plot(*r.series("val_ppl", r.evals), marker="o", label=r.label)
    a1.set(title="training loss", xlabel="step", ylabel="loss")
    a2.set(title="validation perplexity", xlabel="step", ylabel="perplexity", yscale="log")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        ax.plot(*r.series("lr"), label=r.label)
    ax.set(title="learning rate", xlabel="step", ylabel="lr")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "lr.png")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, r in enumerate(runs):
        color = f"C{i}"
        a1.plot(*r.series("tokens_per_s"), color=color, label=r.label)
        steps, mfu = r.series("mfu")
        if steps:
            a2.plot(steps, [100 * v for v in mfu], color=color, label=f"{r.label}: SL FLOPs")
            steps, mfu_d = r.series("mfu_dense_equivalent")
            a2.plot(steps, [100 * v for v in mfu_d], color=color, ls="--", label=f"{r.label}: dense-equivalent")
    a1.set(title="throughput (global)", xlabel="step", ylabel="tokens / s")
    a2.set(title="model FLOPs utilization", xlabel="step", ylabel="MFU (%)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    save(fig, "throughput.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(runs):
        recs = [x for x in r.train if x.get("rank_memory_bytes")]
        if not recs:
            continue
        for k in range(len(recs[0]["rank_memory_bytes"])):
            ax.plot([x["step"] for x in recs], [x["rank_memory_bytes"][k] / 2**20 for x in recs], color=f"C{i}",
                    alpha=1.0 if k == 0 else 0.5, label=f"{r.label} rank {k}")
    kinds = {r.info.get("memory_kind") or (r.train[-1].get("memory_kind") if r.train else None) for r in runs}
    ax.set(title="memory per rank (" + ", ".join(sorted(k for k in kinds if k)) + ")", xlabel="step", ylabel="MiB")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "memory.png")

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(runs) + 3), 4.2))
    bottoms = [0.0] * len(runs)
    names = [r.label for r in runs]
    in_step = PHASES[:3]  # a checkpoint runs between steps: stacked on top of the step time
    for j, phase in enumerate((*in_step, "other", "checkpoint")):
        vals = []
        for r in runs:
            recs = r.train[1:] or r.train  # the first step is warm-up
            if not recs:
                vals.append(0.0)
                continue
            mean = lambda k: sum(x.get(k) or 0.0 for x in recs) / len(recs)  # noqa: E731
            if phase == "other":
                vals.append(max(0.0, mean("step_time_s") - sum(mean(f"{p}_s") for p in in_step)))
            else:
                vals.append(mean(f"{phase}_s"))
        label = {"forward_backward": "forward+backward", "checkpoint": "checkpoint (between steps)"}.get(phase, phase)
        ax.bar(names, [v * 1e3 for v in vals], bottom=[b * 1e3 for b in bottoms], label=label, color=f"C{j}")
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    ax.set(title="mean time per step by phase (after the first step)", ylabel="ms")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    save(fig, "step_time.png")
    return files


def _table(rows, header=None) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header) if header else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{'<tr>' + h + '</tr>' if h else ''}{body}</table>"


def write_report(run_dirs, out_dir: Optional[Path] = None) -> Path:
    """Write the plots and ``index.html`` for ``run_dirs`` into ``out_dir`` (default: the single
    run's ``report/``, or ``report/`` next to several runs' common parent); returns index.html."""
    runs = [Run(Path(d)) for d in run_dirs]
    if not runs:
        raise ReportError("no run directories given")
    if out_dir is None:
        if len(runs) == 1:
            out_dir = runs[0].path / "report"
        else:
            parents = {r.path.resolve().parent for r in runs}
            out_dir = (parents.pop() if len(parents) == 1 else Path.cwd()) / "report"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(runs, out)

    finals = [r.final() for r in runs]
    keys = list(finals[0])
    final_table = _table([[html.escape(k)] + [_fmt(f[k]) for f in finals] for k in keys],
                         header=["", *[r.label for r in runs]])
    parts = ["<h2>Final figures</h2>", final_table, "<h2>Plots</h2>"]
    parts += [f'<p><a href="{p}"><img src="{p}" alt="{p}" style="max-width:100%"></a></p>' for p in plots]
    for r in runs:
        parts.append(f"<h2>{html.escape(r.label)}</h2><p>run directory: <code>{html.escape(str(r.path.resolve()))}"
                     "</code></p>")
        info = r.info
        if info:
            split = info.get("params_split", {})
            rows = [[html.escape(k), _fmt(v)] for k, v in split.items()]
            rows += [["parameter bytes", _fmt(info.get("parameter_bytes"))],
                     ["model FLOPs / step (SL)", _fmt(info.get("flops_per_step"))],
                     ["model FLOPs / step (dense-equivalent)", _fmt(info.get("dense_equivalent_flops_per_step"))],
                     ["peak FLOP/s per device (MFU basis)",
                      f"{_fmt(info.get('peak_flops_per_device'))} ({html.escape(str(info.get('peak_flops_source')))})"],
                     ["labels", html.escape(f"run={info.get('run')} job_id={info.get('job_id')} "
                                            f"tp={info.get('tp')} dp={info.get('dp')}")]]
            parts.append("<h3>Parameters and FLOPs</h3>" + _table(rows))
        elif r.summary:
            parts.append(f"<p>parameters: {_fmt(r.summary.get('params'))}</p>")
        parts.append(f"<details><summary>config.yaml</summary><pre>{html.escape(r.config)}</pre></details>")
    title = "megatron-sl report: " + ", ".join(r.label for r in runs)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
            "pre{background:#f6f6f6;padding:1em}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>" + "\n".join(parts) + "</body></html>\n")
    index = out / "index.html"
    index.write_text(page)
    return index
