"""Process-group setup for one training rank: launcher environment, torch.distributed, DeepSpeed's
communication backend (without its shm JIT build on CPU), megatron parallel_state (TP x DP) and
the CPU shims.

Launchers understood: torchrun and the ``deepspeed`` launcher (both export RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT), ``srun`` one task per rank (SLURM_* variables are mapped
onto the torch ones) and Open MPI's ``mpirun`` (OMPI_COMM_WORLD_*). Backend: gloo on CPU, nccl on
CUDA. On CPU a rank also keeps the memory it frees for reuse (``retain_freed_memory``).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int


def map_launcher_env(environ=os.environ) -> None:
    """Fill the torch.distributed variables from Slurm or Open MPI when a launcher set only those."""
    if "RANK" in environ:
        return
    if "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:  # inside `srun`, one task per rank
        environ["RANK"] = environ["SLURM_PROCID"]
        environ["WORLD_SIZE"] = environ["SLURM_NTASKS"]
        environ["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in environ:
            hosts = []
            try:
                hosts = subprocess.run(["scontrol", "show", "hostnames", environ["SLURM_JOB_NODELIST"]],
                                       capture_output=True, text=True, check=False).stdout.split()
            except (OSError, KeyError):
                pass
            environ["MASTER_ADDR"] = hosts[0] if hosts else "127.0.0.1"
        environ.setdefault("MASTER_PORT", str(29500 + int(environ.get("SLURM_JOB_ID", "0")) % 2000))
    elif "OMPI_COMM_WORLD_RANK" in environ:
        environ["RANK"] = environ["OMPI_COMM_WORLD_RANK"]
        environ["WORLD_SIZE"] = environ["OMPI_COMM_WORLD_SIZE"]
        environ["LOCAL_RANK"] = environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
        environ.setdefault("MASTER_ADDR", "127.0.0.1")
        environ.setdefault("MASTER_PORT", "29500")


def in_launcher(environ=os.environ) -> bool:
    """True when this process is one rank started by a launcher (torchrun, deepspeed, srun, mpirun)."""
    map_launcher_env(environ)
    return "RANK" in environ and "WORLD_SIZE" in environ


def rank_env(environ=os.environ) -> RankEnv:
    map_launcher_env(environ)
    return RankEnv(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", "0")))


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("launch.device='cuda' but no CUDA device is available")
    return requested


def import_deepspeed(device: str):
    """Import DeepSpeed for ``device`` with its CPU shm-op JIT build disabled.

    On CPU every DeepSpeed ``TorchBackend`` JIT-compiles ``deepspeed_shm_comm`` (65-140 s cold), used
    only by inference all-reduce. The function must be replaced on the module object in
    ``sys.modules``: ``import deepspeed.comm.torch as m`` binds the *torch* package instead.
    """
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401  (load the module so it is in sys.modules)

    if device == "cpu":
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return deepspeed


# glibc mallopt(3) parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_INT_MAX = 2**31 - 1


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process for reuse: no ``mmap`` for large blocks
    and no trimming of the heap top (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=INT_MAX). Returns False
    where the C library has no ``mallopt`` (not glibc); nothing is changed there.

    A CPU training step frees and allocates the same large buffers every step (activations, logits,
    the optimizer's temporaries over the flat fp32 partition). glibc maps blocks above its mmap
    threshold (128 KiB rising to 32 MiB) anew and unmaps them on free, so every step faults their
    pages in again, and where the hypervisor reclaims freed guest pages each fault also exits to
    the host. On the 2-core CI machine, 60M at TP=2 (``benchmarks/bench_train.py --tp2``), rank 0's
    system time per step fell from 1.0-1.3 s to 0.2-0.3 s, dense and SL alike. The cost: resident
    memory stays at the process's high-water mark (plus glibc's fragmentation), which a training
    process reaches in its first steps anyway. PyTorch's CPU performance tuning guide gets the
    same effect by preloading jemalloc or tcmalloc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))


def init_distributed(device: str, tp: int, seed: int, *, use_deepspeed: bool, timeout_minutes: int = 30) -> RankEnv:
    """torch.distributed + (DeepSpeed comm) + megatron parallel_state + shims + model-parallel seeds.

    Idempotent for the process group; parallel_state is (re)initialised with ``tp`` each call so one
    process can run several trainings (tests).
    """
    env = rank_env()
    if device == "cuda":
        torch.cuda.set_device(env.local_rank)
    backend = "nccl" if device == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(minutes=timeout_minutes))
    if use_deepspeed:
        deepspeed = import_deepspeed(device)
        deepspeed.init_distributed(dist_backend=backend)
    from ..parallel.state import initialize_model_parallel

    initialize_model_parallel(tp, seed=seed)  # with the CPU shims where there is no CUDA
    return env


# Warnings every rank would print on import / first use that say nothing about this run.
KNOWN_NOISE = (
    r".*Transformer Engine and Apex are not installed.*",
    r".*Apex is not installed.*",
    r".*full scope is deprecated.*",
    r".*all_gather_into_tensor` is deprecated.*",
    r".*Setting accelerator to CPU.*",
)


def silence_known_warnings() -> None:
    import warnings

    for pattern in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
