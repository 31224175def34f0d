"""Starting ranks from ``megatron-sl train`` / ``megatron-sl demo`` when no launcher did, and the
process-tree rules that make signals and deaths behave.

The launching process has already validated the config (nothing is written before that); it then
runs ``torchrun`` with ``launch.nproc_per_node`` local processes on the same command line, one
OpenMP thread per process unless the caller set ``OMP_NUM_THREADS`` (2 ranks x 2 threads on 2 cores
make steps 8-40x slower by spin-waiting). Each rank validates again, cheaply, before its
distributed init.

Signals (``supervise``): the launcher blocks SIGINT/SIGTERM/SIGUSR1/SIGUSR2 and forwards each to
the torchrun agent (``training.preemption``), which forwards it to the ranks. The agent runs in
its own session, so a terminal's Ctrl-C (sent to the whole foreground process group) reaches the
ranks once, through this path, not three times; torchrun's workers are in sessions of their own
anyway. The first SIGINT/SIGTERM/SIGUSR1 is a stop request (every rank finishes its step, one
checkpoint is committed, exit 75); a SIGINT after that aborts: the agent and the ranks are
killed at once (exit 130).

Deaths: the agent and every rank set ``PR_SET_PDEATHSIG`` = SIGKILL (``die_with_parent``), so
``kill -9`` of the launcher (or of its process group) takes the agent and then the ranks with it.
The launcher returns only when no process it started (agent or rank) is alive.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from typing import List, Optional, Set

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
STOP = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
PARENT_PID_ENV = "MSL_PARENT_PID"  # set by a launcher of ours for its child: the pid it must die with
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux; elsewhere a no-op).
    With ``MSL_PARENT_PID`` set, exit at once if that parent is already gone (it died before the
    request took effect)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    expected = os.environ.get(PARENT_PID_ENV)
    if expected and expected.isdigit() and os.getppid() != int(expected):
        os._exit(1)


def torchrun_command(nproc: int, module_args: List[str], master_port: Optional[int] = None) -> List[str]:
    """torchrun for one node (through ``training.preemption``'s wrapper, which forwards stop signals
    to the ranks and exits 75 when they checkpointed after one), running ``python -m
    <module_args...>``; ``--standalone`` unless ``master_port`` is given."""
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


def _stat_fields(pid) -> Optional[list]:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, ppid, ...), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2:].split()


def process_table() -> dict:
    """``{pid: parent pid}`` of every process, from /proc (includes processes in other sessions)."""
    table = {}
    for entry in os.listdir("/proc"):
        fields = _stat_fields(entry) if entry.isdigit() else None
        if fields is not None and len(fields) > 1:
            table[int(entry)] = int(fields[1])
    return table


def descendants(pid: int) -> Set[int]:
    """Every live descendant of ``pid``."""
    children: dict = {}
    for kid, parent in process_table().items():
        children.setdefault(parent, []).append(kid)
    out, todo = set(), [pid]
    while todo:
        for kid in children.get(todo.pop(), []):
            if kid not in out:
                out.add(kid)
                todo.append(kid)
    return out


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != b"Z"  # a zombie has exited


def _kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _waited_signal(info, waited) -> "signal.Signals | None":
    """The signal ``sigtimedwait`` returned, or None for a timeout -- or for a wake-up that carries
    no signal of ``waited`` (seen after the process was stopped and continued: ``si_signo`` then
    holds garbage)."""
    if info is None or info.si_signo not in {int(s) for s in waited}:
        return None
    return signal.Signals(info.si_signo)


def supervise(proc: subprocess.Popen, announce: bool = True) -> int:
    """Forward stop signals to ``proc`` (the agent) until it exits, abort on a SIGINT after a stop
    request, and return its exit code once none of its descendants is alive. The caller has blocked
    ``FORWARDED`` in this thread."""
    seen: Set[int] = set()
    stop_sent, aborted = False, False
    while True:
        seen |= descendants(proc.pid)
        if proc.poll() is not None:
            break
        info = signal.sigtimedwait(FORWARDED, 0.5)
        sig = _waited_signal(info, FORWARDED)
        if sig is None:
            continue
        if sig == signal.SIGINT and stop_sent:
            aborted = True
            print("[megatron-sl] interrupted again: killing the ranks now, without a checkpoint", file=sys.stderr,
                  flush=True)
            _kill_all([proc.pid, *(seen | descendants(proc.pid))])
            continue
        if sig in STOP and not stop_sent:
            stop_sent = True
            if announce:
                print(f"[megatron-sl] received {sig.name}: every rank finishes its step, saves a checkpoint and the "
                      f"run exits with 75 (press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
    rc = proc.returncode
    deadline = time.monotonic() + 30
    while True:  # the ranks die with the agent (PDEATHSIG); never return while one lives
        left = [p for p in seen if _alive(p)]
        if not left:
            break
        if time.monotonic() > deadline:
            _kill_all(left)
            deadline = time.monotonic() + 30
        time.sleep(0.1)
    if aborted:
        return 130
    return rc if rc >= 0 else 128 - rc


def run_local_ranks(nproc: int, config_path: Optional[str], overrides: List[str],
                    master_port: Optional[int] = None, lock=None) -> int:
    """Run ``megatron_sl.cli.train`` in ``nproc`` ranks under torchrun; return its exit code.
    ``lock``: the ``RunLock`` this process holds for the ranks (they are told not to take it)."""
    from .runlock import HELD_ENV

    args = ["megatron_sl.cli.train"]
    if config_path is not None:
        args += ["--config", str(config_path)]
    args += list(overrides)
    cmd = torchrun_command(nproc, args, master_port)
    env = rank_environment()
    env[PARENT_PID_ENV] = str(os.getpid())
    if lock is not None and lock.held:
        env[HELD_ENV] = str(lock.path.resolve())
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    try:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        try:
            return supervise(proc)
        except BaseException:
            _kill_all([proc.pid, *descendants(proc.pid)])
            raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
