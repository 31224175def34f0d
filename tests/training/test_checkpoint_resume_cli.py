"""Exact resume through ``megatron-sl train`` (2 gloo ranks, ZeRO-1, fp32, the shrunk tiny SL preset):
N steps straight vs. the same run with a checkpoint every N/2 steps, ``kill -9`` of rank 1 after
the mid-run checkpoint, and a relaunch of the same command that resumes from ``latest`` and runs to
N. Every step's loss (the last one recorded for that step) must equal the straight run's bitwise,
and the relaunch must start at step N/2 + 1.

Needs the trainer's side of the issue-6 contract: ``run.save_interval`` and resume from
``<run>/checkpoints/latest`` in an existing run directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from training_helpers import REPO, megatron_sl_cmd, rank_env, tiny_overrides

N = 24
TINY_SL = REPO / "configs" / "tiny_sl.yaml"


def _cmd(data, out: Path, *extra):
    return megatron_sl_cmd("train", "--config", str(TINY_SL),
                           *tiny_overrides(data, out, f"train.train_iters={N}", "train.global_batch_size=8",
                                           "eval.interval=0", "eval.iters=1", "eval.at_start=false",
                                           "launch.nproc_per_node=2", "deepspeed.zero_stage=1", *extra))


def _records(run: Path) -> list:
    """(step, loss) of every train record, in file order (a relaunch appends)."""
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in recs if r.get("kind") == "train"]


def _descendants(pid: int) -> list:
    kids, todo = [], [pid]
    while todo:
        p = todo.pop()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            if int(stat[stat.rfind(b")") + 2:].split()[1]) == p:
                kids.append(int(entry))
                todo.append(int(entry))
    return kids


def _rank_pid(root: int, rank: int):
    for pid in _descendants(root):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b" ".join(env):
            return pid
    return None


@pytest.mark.slow
def test_kill9_one_rank_then_relaunch_resumes_exactly(tiny_data, tmp_path):
    straight = subprocess.run(_cmd(tiny_data, tmp_path / "straight"), cwd=REPO, env=rank_env(), capture_output=True,
                              text=True, timeout=600)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    ref = dict(_records(tmp_path / "straight"))
    assert sorted(ref) == list(range(1, N + 1))

    run = tmp_path / "resumed"
    cmd = _cmd(tiny_data, run, f"run.save_interval={N // 2}")
    proc = subprocess.Popen(cmd, cwd=REPO, env=rank_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not (latest.exists() and latest.read_text().strip() == f"step_{N // 2:08d}"):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    victim = _rank_pid(proc.pid, 1)
    assert victim is not None, "rank 1 not found among the launcher's descendants"
    os.kill(victim, signal.SIGKILL)
    out1, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out1
    killed_at = _records(run)[-1][0]
    assert N // 2 <= killed_at < N, f"the kill came too late (step {killed_at}):\n{out1}"

    again = subprocess.run(cmd, cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    recs = _records(run)
    # the killed run's steps, then the relaunch from the checkpoint at N/2 (not from scratch)
    assert [s for s, _ in recs] == list(range(1, killed_at + 1)) + list(range(N // 2 + 1, N + 1)), recs
    final = dict(recs)  # the last record of each step
    mismatched = {s: (final[s], ref[s]) for s in ref if final[s] != ref[s]}
    assert not mismatched, f"losses differ after resume (step: (resumed, straight)): {mismatched}"
    print(f"rank 1 killed at step {killed_at}; resumed at step {N // 2 + 1}; {N} losses bitwise equal")
