"""Run outputs written by global rank 0: the per-run metrics JSONL and the progress bar.

``metrics.jsonl`` holds one JSON object per line with a ``kind``:
* ``train``: step (1-based count of updates done), loss (mean over the global batch), lr (of that
  update), grad_norm (before clipping), tokens_per_s, consumed_samples, step_time_s, plus the
  monitoring figures (phase times ``*_s``, mfu, mfu_dense_equivalent, per-rank tokens/s, step time
  and memory, optimizer-state bytes, non-finite/skipped step counts, unix ``time``);
* ``eval``: step, val_loss, val_ppl, val_tokens;
* ``preempted``: step at which a stop signal ended the run (after its checkpoint was committed);
* ``run``: written once at start by ``training.monitoring``: labels (run, job_id, tp, dp), parameter
  split and bytes, model FLOPs per step (SL and dense-equivalent), the peak FLOP/s MFU uses;
* ``checkpoint``: step, duration_s, size_bytes, path, ok of each save;
* ``summary``: the end-of-run record (also written to ``summary.json``), including optimizer-state
  bytes per parameter.
Lines are flushed as they are written, so a killed run keeps everything up to its last step.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional


class MetricsLog:
    def __init__(self, path: Optional[Path]):
        self.path = path
        self._f = open(path, "a", buffering=1) if path is not None else None

    def write(self, kind: str, **fields) -> None:
        if self._f is None:
            return
        rec = {"kind": kind}
        for k, v in fields.items():
            rec[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        self._f.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class Progress:
    """tqdm bar (tokens/s, loss, lr) on rank 0; silent elsewhere or when disabled."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=0.5)

    def update(self, loss: float, lr: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix({"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tokens_per_s:,.0f}"},
                                 refresh=False)
            self.bar.update(1)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
