"""Starting ranks from ``megatron-sl train`` / ``megatron-sl demo`` when no launcher did.

The launching process has already validated the config (nothing is written before that); it then
runs ``torchrun`` with ``launch.nproc_per_node`` local processes on the same command line, one
OpenMP thread per process unless the caller set ``OMP_NUM_THREADS`` (2 ranks x 2 threads on 2 cores
make steps 8-40x slower by spin-waiting). Each rank validates again, cheaply, before its
distributed init.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import List, Optional


def torchrun_command(nproc: int, module_args: List[str], master_port: Optional[int] = None) -> List[str]:
    """torchrun for one node (through ``training.preemption``'s wrapper, which forwards
    SIGUSR1/SIGUSR2 to the ranks and exits 75 when they checkpointed after a stop signal),
    running ``python -m <module_args...>``; ``--standalone`` unless ``master_port`` is given."""
    rdzv = ["--standalone"] if master_port is None else ["--master_addr", "127.0.0.1", "--master_port", str(master_port)]
    return [sys.executable, "-m", "megatron_sl.training.preemption", "--nnodes", "1", "--nproc_per_node", str(nproc),
            *rdzv, "--module", *module_args]


def rank_environment(base: Optional[dict] = None) -> dict:
    env = dict(os.environ if base is None else base)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # torchrun sets them per rank
    return env


def run_local_ranks(nproc: int, config_path: Optional[str], overrides: List[str],
                    master_port: Optional[int] = None) -> int:
    """Run ``megatron_sl.cli.train`` in ``nproc`` ranks under torchrun; return its exit code."""
    args = ["megatron_sl.cli.train"]
    if config_path is not None:
        args += ["--config", str(config_path)]
    args += list(overrides)
    cmd = torchrun_command(nproc, args, master_port)
    return subprocess.run(cmd, env=rank_environment()).returncode
