"""Multi-process test harness on CPU: run a function on N gloo ranks and collect the results.

``run_distributed(fn, world_size, *args, timeout=..., **kwargs)`` forks ``world_size`` processes
(``torch.multiprocessing`` fork context, so heavy imports done in the parent -- megatron-core takes
~10 s -- are inherited, not repeated). Each child gets MASTER_ADDR / MASTER_PORT (a free port),
RANK, WORLD_SIZE, LOCAL_RANK and OMP_NUM_THREADS=1, calls ``init_process_group("gloo")``, runs
``fn(rank, world_size, *args, **kwargs)`` and sends back either its return value (plain pickle,
so tensors are copied, not shared) or its traceback. The parent returns the list of results by
rank, and raises with every rank's traceback if any rank failed, died, exited non-zero or ran past
``timeout`` (then all ranks are killed). A failed port bind is retried on a new port.

``init_megatron(tp, pp=1, seed=1234)`` (call inside ``fn``) applies the CPU shims and initialises
megatron's parallel_state and RNG tracker; ``gather_sharded`` reassembles a TP-sharded tensor
from megatron's partition attributes.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import time
import traceback
from multiprocessing.connection import wait

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT = 180.0
_PORT_ERRORS = ("EADDRINUSE", "Address already in use", "address already in use")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world_size, port, conn, timeout, args, kwargs):
    code = 1
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
        torch.set_num_threads(1)
        import datetime

        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        result = fn(rank, world_size, *args, **kwargs)
        dist.barrier()  # nobody tears down the store while a peer still needs it
        # plain pickle (not torch's shared-memory reductions, whose fds die with this process)
        conn.send_bytes(pickle.dumps(("ok", result)))
        code = 0
    except BaseException:  # noqa: BLE001 -- everything goes back to the parent
        try:
            conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
        except Exception:  # noqa: BLE001
            pass
    finally:
        try:
            conn.close()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)  # skip the forked parent's atexit handlers (pytest's)


def _run_once(fn, world_size, args, kwargs, timeout):
    ctx = mp.get_context("fork")
    port = free_port()
    procs, conns = [], {}
    for rank in range(world_size):
        parent_end, child_end = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child, args=(fn, rank, world_size, port, child_end, timeout, args, kwargs),
                        daemon=True)
        p.start()
        child_end.close()
        procs.append(p)
        conns[parent_end] = rank
    results, errors = {}, {}
    deadline = time.monotonic() + timeout
    grace_until = None
    open_conns = dict(conns)
    while open_conns:
        now = time.monotonic()
        limit = deadline if grace_until is None else min(deadline, grace_until)
        if now >= limit:
            break
        for c in wait(list(open_conns), timeout=limit - now):
            rank = open_conns.pop(c)
            try:
                status, payload = pickle.loads(c.recv_bytes())
            except (EOFError, OSError):
                status, payload = "error", "process ended without reporting (crashed or killed)"
            if status == "ok":
                results[rank] = payload
            else:
                errors[rank] = payload
                if grace_until is None:  # peers may now hang in a collective: give them a few seconds
                    grace_until = time.monotonic() + 10.0
    for p in procs:
        p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
    timed_out = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    for rank in open_conns.values():
        errors.setdefault(rank, "no result: timed out" if rank in timed_out else "no result")
    codes = [p.exitcode for p in procs]
    return results, errors, codes, timed_out


def run_distributed(fn, world_size: int, *args, timeout: float = DEFAULT_TIMEOUT, retries: int = 2, **kwargs):
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks; results by rank."""
    for attempt in range(retries + 1):
        results, errors, codes, timed_out = _run_once(fn, world_size, args, kwargs, timeout)
        port_clash = errors and any(any(s in e for s in _PORT_ERRORS) for e in errors.values())
        if port_clash and attempt < retries:
            continue
        break
    failed = errors or any(c != 0 for c in codes)
    if failed:
        report = [f"run_distributed({getattr(fn, '__name__', fn)}, world_size={world_size}) failed; "
                  f"exit codes {codes}" + (f"; timed out after {timeout}s: ranks {timed_out}" if timed_out else "")]
        for rank in sorted(errors):
            report.append(f"--- rank {rank} ---\n{errors[rank]}")
        raise AssertionError("\n".join(report))
    return [results[r] for r in range(world_size)]


# ----------------------------------------------------------------------------- megatron helpers

def init_megatron(tp: int = 1, pp: int = 1, seed: int = 1234) -> None:
    """Inside a rank: megatron parallel_state (TP x PP, rest DP) and RNG seeding, through the
    project's one set-up function (which applies the CPU shims)."""
    from megatron_sl.parallel.state import initialize_model_parallel

    initialize_model_parallel(tp, pp, seed=seed)


def gather_sharded(t: torch.Tensor, param=None, group=None) -> torch.Tensor:
    """Reassemble the global tensor of a TP shard using megatron's attributes on ``param``
    (``tensor_model_parallel``, ``partition_dim``, ``partition_stride``); replicated tensors are
    returned as is. SL ``values`` shards (``sl_global_index_fn``) are put in global support order
    by sorting the gathered values by their global flat index."""
    param = t if param is None else param
    if not getattr(param, "tensor_model_parallel", False):
        return t
    if group is None:
        from megatron.core import parallel_state as ps
        group = ps.get_tensor_model_parallel_group()
    index_fn = getattr(param, "sl_global_index_fn", None)
    if index_fn is not None:
        vals = torch.cat(all_gather_var(t.detach(), 0, group))
        flat = torch.cat(all_gather_var(index_fn(), 0, group))
        assert flat.unique().numel() == flat.numel(), "TP shards of one SL matrix overlap"
        return vals[torch.argsort(flat)]
    d, s = param.partition_dim, param.partition_stride
    parts = all_gather_var(t.detach(), d, group)
    return torch.cat([parts[r].chunk(s, dim=d)[k] for k in range(s) for r in range(len(parts))], dim=d)


def all_gather_var(t: torch.Tensor, dim: int, group) -> list:
    """all_gather of tensors whose sizes may differ along ``dim`` (the other dims must agree)."""
    world = dist.get_world_size(group)
    if world == 1:
        return [t]
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([t.shape[dim]]), group=group)
    n_max = int(max(x.item() for x in sizes))
    pad_shape = list(t.shape)
    pad_shape[dim] = n_max - t.shape[dim]
    padded = torch.cat([t, t.new_zeros(pad_shape)], dim=dim).contiguous()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return [p.narrow(dim, 0, int(n.item())) for p, n in zip(parts, sizes)]
