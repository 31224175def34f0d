"""Graceful preemption: both ends of the signal path from Slurm (or a user) to the training ranks.

Trainer side, ``PreemptionHandler``: SIGUSR1 / SIGTERM / SIGINT set a local flag (nothing else
happens in the handler; a second SIGINT, at least ``DUPLICATE_WINDOW_S`` after the first, aborts the
rank at once with exit code 130, no traceback; sooner it is the same interrupt delivered twice, e.g.
by ``scancel --signal=INT`` directly and through the agent). Once per step every rank calls ``should_stop(group)``, which all-reduces the flag (MAX),
so all ranks agree on the stopping step even when the signal reached them at different times; the
trainer then finishes that step, writes a checkpoint and exits with ``EXIT_PREEMPTED`` = 75
(EX_TEMPFAIL: "checkpointed, retry later"), which the Slurm scripts turn into ``scontrol requeue``.
SIGUSR2 (``save_signals``) asks for an on-demand checkpoint without stopping: ``poll(group)`` returns
both decisions with one all-reduce.

Launcher side, ``torchrun_main`` (``python -m megatron_sl.training.preemption <torchrun args>``): one
node's torchrun with two fixes for preemption, used by ``slurm/*.sh``:

* torchrun does not handle SIGUSR1 (default action: the agent dies, its workers are orphaned and
  then killed when the step ends) and turns SIGTERM/SIGINT into tearing the workers down (SIGTERM,
  then SIGKILL after a timeout) instead of letting them checkpoint.
  Here the agent blocks SIGUSR1/SIGUSR2/SIGTERM/SIGINT and a thread forwards them to its worker
  processes (which torchrun starts in sessions of their own, so a terminal's Ctrl-C reaches them
  only this way); a SIGINT after a stop signal kills the workers at once (exit 130). The block is
  inherited by the workers, so a signal that arrives while a worker is still importing stays
  pending instead of killing it; ``PreemptionHandler.install`` unblocks it and it is delivered
  then. (Under Slurm, ``srun``/``scancel --signal`` also signal every process of the step
  directly; a worker seeing a stop signal twice is harmless.) The agent dies with its parent and
  the workers with the agent (``PR_SET_PDEATHSIG``, ``training.launch.die_with_parent``).
* torchrun exits 1 whenever a worker exits non-zero. Here the exit code is 75 when workers exited
  with 75 and none crashed (``exit_code_for``), so a preempted node reports 75 to ``srun``; with
  ``MSL_NODE_EXIT_DIR`` set, each node also records "<code> <kind>" for the batch script
  (``_record_exit``).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

EXIT_PREEMPTED = 75
EXIT_ABORTED = 130
DUPLICATE_WINDOW_S = 1.0  # a second SIGINT sooner than this is a duplicate delivery, not a second Ctrl-C
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
SAVE_SIGNALS = (signal.SIGUSR2,)
FORWARDED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
# exit codes of megatron-sl train whose reason the rank already printed in one line (training.guards)
EXPLAINED_EXIT_CODES = {2: "bad input", 3: "diverged", 4: "stalled", 5: "checkpoint not written",
                        EXIT_ABORTED: "aborted"}


@dataclass(frozen=True)
class Decision:
    """What all ranks agreed on this step."""

    stop: bool
    save: bool


def _as_signals(values: Iterable) -> tuple:
    out = []
    for v in values:
        try:
            out.append(signal.Signals(v))
        except ValueError:
            raise ValueError(f"{v!r} is not a signal number") from None
    return tuple(out)


class PreemptionHandler:
    """Installs handlers for ``stop_signals`` (default SIGUSR1, SIGTERM) and ``save_signals``
    (default SIGUSR2) that only set flags. Use as a context manager or ``install()``/``uninstall()``;
    must be installed from the main thread. ``exit_code`` is ``EXIT_PREEMPTED``."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, stop_signals: Sequence = STOP_SIGNALS, save_signals: Sequence = SAVE_SIGNALS,
                 *, announce: bool = True):
        self.stop_signals = _as_signals(stop_signals)
        self.save_signals = _as_signals(save_signals)
        both = set(self.stop_signals) & set(self.save_signals)
        if both:
            raise ValueError(f"signals {sorted(s.name for s in both)} cannot both stop and save")
        self.announce = announce
        self._stop = False
        self._save = False
        self.received: List[str] = []
        self._previous = {}
        self._first_sigint: Optional[float] = None

    # -- handlers --------------------------------------------------------------------------
    def _handle(self, signum, frame) -> None:
        sig = signal.Signals(signum)
        if sig == signal.SIGINT:
            now = time.monotonic()
            if self._first_sigint is not None:
                if now - self._first_sigint < DUPLICATE_WINDOW_S:
                    return  # the same interrupt delivered twice (directly and forwarded by a launcher)
                os.write(2, f"[preemption] rank {os.environ.get('RANK', '?')}: second SIGINT; aborting without a "
                            f"checkpoint\n".encode())
                os._exit(EXIT_ABORTED)
            self._first_sigint = now
        self.received.append(sig.name)
        if sig in self.stop_signals:
            self._stop = True
            what = f"will checkpoint after the current step and exit with code {EXIT_PREEMPTED}"
        else:
            self._save = True
            what = "will checkpoint after the current step and continue"
        if self.announce:  # os.write: safe even if the signal interrupted a print
            rank = os.environ.get("RANK", "?")
            os.write(2, f"[preemption] rank {rank}: received {sig.name}; {what}\n".encode())

    def install(self) -> "PreemptionHandler":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler.install() must be called from the main thread")
        sigs = self.stop_signals + self.save_signals
        for sig in sigs:
            self._previous[sig] = signal.signal(sig, self._handle)
        # a launcher (torchrun_main) may have started us with these blocked: deliver pending ones now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    # -- local state -----------------------------------------------------------------------
    @property
    def stop_requested(self) -> bool:
        """This rank's flag (not agreed with the others; use ``should_stop`` in the loop)."""
        return self._stop

    def request_stop(self) -> None:
        self._stop = True

    def request_save(self) -> None:
        self._save = True

    # -- collective decisions --------------------------------------------------------------
    def _reduce(self, flags: List[int], group) -> List[int]:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return flags
        device = torch.device("cpu")
        if "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        t = torch.tensor(flags, dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return [int(v) for v in t.tolist()]

    def poll(self, group=None) -> Decision:
        """Collective: stop if any rank got a stop signal, save if any rank got a save signal.
        Clears the save request (one signal, one checkpoint); the stop flag stays set."""
        stop, save = self._reduce([int(self._stop), int(self._save)], group)
        self._save = False
        if stop:
            self._stop = True
        return Decision(stop=bool(stop), save=bool(save))

    def should_stop(self, group=None) -> bool:
        """Collective (every rank, every step): True on all ranks if any rank got a stop signal."""
        (stop,) = self._reduce([int(self._stop)], group)
        if stop:
            self._stop = True
        return bool(stop)


# ------------------------------------------------------------------------------------------
# launcher side
# ------------------------------------------------------------------------------------------
def child_pids(parent: Optional[int] = None) -> List[int]:
    """Direct children of ``parent`` (default: this process), from /proc."""
    from .launch import process_table

    parent = os.getpid() if parent is None else parent
    return [pid for pid, ppid in process_table().items() if ppid == parent]


class _Forwarder:
    """The agent's signal thread: forwards each signal in ``sigs`` to this process's children (the
    workers). A signal that arrives before any worker exists (the agent is still rendezvousing) is
    kept and forwarded once workers appear. A SIGINT after a stop signal kills the workers."""

    def __init__(self, sigs: Sequence[signal.Signals], poll_s: float = 0.5):
        self.sigs, self.poll_s = tuple(sigs), poll_s
        self.stop_seen = False
        self.aborted = False

    def run(self) -> None:
        pending: List[signal.Signals] = []
        while True:
            info = signal.sigtimedwait(set(self.sigs), self.poll_s)
            # after a SIGSTOP/SIGCONT of this process, a wake-up may carry a garbage si_signo: ignore it
            if info is not None and info.si_signo in {int(x) for x in self.sigs}:
                sig = signal.Signals(info.si_signo)
                if sig == signal.SIGINT and self.stop_seen:
                    self.aborted = True
                    kids = child_pids()
                    os.write(2, f"[torchrun-node] second interrupt: killing workers {kids}\n".encode())
                    for pid in kids:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    pending.clear()
                    continue
                self.stop_seen = self.stop_seen or sig in STOP_SIGNALS
                pending.append(sig)
            if not pending:
                continue
            kids = child_pids()
            if not kids:
                continue
            os.write(2, f"[torchrun-node] forwarding {[s.name for s in pending]} to workers {kids}\n".encode())
            for sig in pending:
                for pid in kids:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            pending.clear()


def exit_code_for(failures: dict) -> int:
    """torchrun's failed workers -> this node's exit code.

    A positive code other than 75 (a crash) wins. Otherwise, if any worker exited with 75 the node
    exits 75: the others were killed by a signal because torchrun tears the group down (SIGTERM,
    then SIGKILL) as soon as the first worker exits, and a worker exits with 75 only after the
    checkpoint has been committed on every rank. No 75 at all (every worker killed) gives 1.
    """
    codes = [f.exitcode for _, f in sorted(failures.items())]
    crashes = [c for c in codes if c > 0 and c != EXIT_PREEMPTED]
    if crashes:
        return crashes[0]
    return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else 1


def torchrun_main(argv: Optional[Sequence[str]] = None) -> int:
    """Run torchrun (same arguments) for this node; see the module docstring."""
    from .launch import PARENT_PID_ENV, die_with_parent

    die_with_parent()  # the megatron-sl launcher, or srun's step daemon
    os.environ[PARENT_PID_ENV] = str(os.getpid())  # the workers die with this agent
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    forwarder = _Forwarder(FORWARDED_SIGNALS)
    threading.Thread(target=forwarder.run, name="signal-forwarder", daemon=True).start()
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    code, kind = 0, "ok"
    try:
        run(args)
    except ChildFailedError as e:
        code = EXIT_ABORTED if forwarder.aborted else exit_code_for(e.failures)
        if code == EXIT_PREEMPTED:
            kind = "preempted"
            print(f"[torchrun-node] workers {sorted(e.failures)} exited with {EXIT_PREEMPTED} (checkpointed after a "
                  f"preemption signal); exiting with {EXIT_PREEMPTED}", file=sys.stderr, flush=True)
        elif code in EXPLAINED_EXIT_CODES:  # the rank printed the reason in one line
            kind = "worker-failed"
            print(f"[torchrun-node] workers exited with {code} ({EXPLAINED_EXIT_CODES[code]})", file=sys.stderr,
                  flush=True)
        else:
            kind = "worker-failed"
            print(e.format_msg() if hasattr(e, "format_msg") else str(e), file=sys.stderr, flush=True)
    except SignalException as e:
        print(f"[torchrun-node] agent received {signal.Signals(e.sigval).name}; workers were signalled",
              file=sys.stderr, flush=True)
        code, kind = 128 + int(e.sigval), "signal"
    except Exception:  # the agent itself failed, e.g. the rendezvous store went away with a peer node
        traceback.print_exc()
        code, kind = 1, "agent-error"
    _record_exit(code, kind)
    return code


def _record_exit(code: int, kind: str) -> None:
    """With ``MSL_NODE_EXIT_DIR`` set (the Slurm scripts do), write ``"<code> <kind>"`` to
    ``<dir>/node-<SLURM_NODEID>.rc``. ``srun`` reports only the largest code of all nodes, and the
    batch script needs to tell a worker crash ("worker-failed") from an agent that lost the
    rendezvous store because a peer node had already exited ("agent-error"): when any node reports
    "preempted", every rank has passed the checkpoint's final barrier, so the checkpoint is
    committed whatever happened to the other agents afterwards. Kinds: ok, preempted,
    worker-failed, signal, agent-error."""
    d = os.environ.get("MSL_NODE_EXIT_DIR")
    if not d:
        return
    node = os.environ.get("SLURM_NODEID", os.environ.get("HOSTNAME", "0"))
    try:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"node-{node}.rc"), "w") as f:
            f.write(f"{code} {kind}\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        print(f"[torchrun-node] cannot record the exit code in {d}: {e}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(torchrun_main())
