"""Helpers of the training tests: the shrunk tiny model and subprocess launching.

``TINY_SHAPE`` shrinks the tiny preset to 2 layers, hidden 64, sequence 32, rank 8, so a step takes
milliseconds and a 2-rank run is dominated by imports. Subprocesses get one OpenMP thread and no
inherited rank variables.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY_SHAPE = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.seq_length=32",
              "sl.rank=8"]


def tiny_overrides(data, output_dir, *extra) -> list:
    prefix, tokenizer = data
    return [*TINY_SHAPE, f"data.prefix={prefix}", f"data.tokenizer={tokenizer}", f"run.output_dir={output_dir}",
            "run.progress_bar=false", *extra]


def rank_env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run(cmd, timeout=600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=timeout, **kw)


def megatron_sl_cmd(*args) -> list:
    return [sys.executable, "-m", "megatron_sl.cli.main", *args]
