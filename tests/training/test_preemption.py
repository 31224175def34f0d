"""PreemptionHandler (signal -> flag -> agreed stop step -> exit 75) and the torchrun node wrapper
(signal forwarding, signals held pending until a worker installs its handler, exit code 75).

The two launcher tests start real torchrun agents (``python -m megatron_sl.training.preemption``)
with 2 gloo workers running this file as a script (``worker`` below)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_sl.training.preemption import (EXIT_PREEMPTED, Decision, PreemptionHandler, child_pids,
                                             exit_code_for)

REPO = Path(__file__).resolve().parents[2]


def _deliver(sig):
    os.kill(os.getpid(), sig)
    for _ in range(100):  # Python runs the handler at the next bytecode boundary
        time.sleep(0.001)


def test_exit_code_is_ex_tempfail():
    assert EXIT_PREEMPTED == 75 == PreemptionHandler.exit_code


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_stop_signal_sets_flag_and_uninstall_restores(sig):
    before = signal.getsignal(sig)
    with PreemptionHandler(announce=False) as h:
        assert not h.stop_requested and not h.should_stop()
        _deliver(sig)
        assert h.stop_requested and h.received == [sig.name]
        assert h.should_stop() and h.should_stop()  # stays set
    assert signal.getsignal(sig) == before


def test_save_signal_requests_one_checkpoint():
    with PreemptionHandler(announce=False) as h:
        _deliver(signal.SIGUSR2)
        assert not h.should_stop()  # does not consume the save request
        assert h.poll() == Decision(stop=False, save=True)
        assert h.poll() == Decision(stop=False, save=False)
        _deliver(signal.SIGUSR1)
        assert h.poll() == Decision(stop=True, save=False)


def test_signal_pending_before_install_is_delivered_at_install():
    # The mask is per thread: a process-directed kill() would go to any other thread of this
    # process that does not block SIGUSR1 (earlier tests leave torch/gloo threads behind) and kill
    # pytest, so direct the signal at this (the main) thread, which blocks it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)  # blocked: stays pending
        h = PreemptionHandler(announce=False)
        h.install()
        for _ in range(100):
            if h.stop_requested:
                break
            time.sleep(0.001)
        assert h.stop_requested and h.received == ["SIGUSR1"]
        assert signal.SIGUSR1 not in signal.pthread_sigmask(signal.SIG_BLOCK, set())
    finally:
        h.uninstall()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})


def test_bad_signal_arguments():
    with pytest.raises(ValueError, match="cannot both stop and save"):
        PreemptionHandler(stop_signals=[signal.SIGUSR1], save_signals=[signal.SIGUSR1])
    with pytest.raises(ValueError, match="9999 is not a signal number"):
        PreemptionHandler(stop_signals=[9999])


def test_exit_code_mapping():
    f = lambda c: SimpleNamespace(exitcode=c)  # noqa: E731
    assert exit_code_for({0: f(75), 1: f(75)}) == 75
    assert exit_code_for({0: f(75), 1: f(-15)}) == 75  # torchrun's teardown of a slower peer
    assert exit_code_for({0: f(75), 1: f(3)}) == 3  # a crash is not a preemption
    assert exit_code_for({0: f(-15), 1: f(-9)}) == 1  # only killed by signals
    assert exit_code_for({}) == 1


def test_child_pids_finds_direct_children():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert p.pid in child_pids()
    finally:
        p.kill()
        p.wait()


# --------------------------------------------------------------------------------------------
# end to end through the torchrun wrapper
# --------------------------------------------------------------------------------------------
def _launch(tmp_path, mode):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "megatron_sl.training.preemption", "--nnodes", "1", "--nproc-per-node", "2",
           "--standalone", __file__, mode, str(tmp_path)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _results(tmp_path):
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_ranks_agree_on_stop_step_and_node_exits_75(tmp_path):
    """rank 1 alone gets SIGUSR1 at step 3; rank 0 got SIGUSR2 while it was starting up (pending,
    not fatal). Both ranks save at step 1, stop after step 3, and the node exits 75."""
    p = _launch(tmp_path, "self")
    out, _ = p.communicate(timeout=180)
    assert p.returncode == EXIT_PREEMPTED, out
    r0, r1 = _results(tmp_path)
    assert r0["stop_step"] == r1["stop_step"] == 3, out
    assert r0["save_steps"] == r1["save_steps"] == [1], out
    assert r0["received"] == ["SIGUSR2"] and r1["received"] == ["SIGUSR1"], out


@pytest.mark.slow
def test_agent_forwards_usr1_to_workers(tmp_path):
    p = _launch(tmp_path, "wait")
    deadline = time.time() + 120
    while not (tmp_path / "ready1").exists() or not (tmp_path / "ready0").exists():
        assert p.poll() is None and time.time() < deadline, p.stdout.read() if p.poll() is not None else "timeout"
        time.sleep(0.2)
    os.kill(p.pid, signal.SIGUSR1)  # only the agent: it must forward
    out, _ = p.communicate(timeout=120)
    assert p.returncode == EXIT_PREEMPTED, out
    r0, r1 = _results(tmp_path)
    assert r0["stop_step"] == r1["stop_step"] and r0["stop_step"] >= 2, out
    assert r0["received"] == r1["received"] == ["SIGUSR1"], out
    assert "forwarding ['SIGUSR1'] to workers" in out


def worker(mode: str, out_dir: str) -> int:
    """One rank: (self) rank 0 signals itself SIGUSR2 before installing the handler, rank 1 sends
    itself SIGUSR1 at step 3; (wait) step until told to stop by the agent."""
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    out = Path(out_dir)
    if mode == "self" and rank == 0:
        os.kill(os.getpid(), signal.SIGUSR2)  # blocked by the agent: must stay pending, not kill us
    dist.init_process_group("gloo")
    h = PreemptionHandler().install()
    save_steps, step = [], 0
    while step < 500:
        step += 1
        time.sleep(0.05)
        if mode == "self" and rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.05)
        if mode == "wait" and step == 2:
            (out / f"ready{rank}").touch()
        d = h.poll()
        if d.save:
            save_steps.append(step)
        if d.stop:
            break
    (out / f"rank{rank}.json").write_text(json.dumps({"stop_step": step, "save_steps": save_steps,
                                                      "received": h.received}))
    dist.barrier()
    dist.destroy_process_group()
    return EXIT_PREEMPTED if d.stop else 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1], sys.argv[2]))
