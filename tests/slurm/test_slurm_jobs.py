"""The real Slurm scripts on a real (local, 2-node) Slurm cluster, training the shrunk tiny preset on
CPU with 2 nodes x 2 gloo ranks:

* ``slurm/train.sbatch`` runs to completion: final JobState COMPLETED 0:0 (read by the wait helper,
  not just an exit status), metrics for every step, a verified final checkpoint written by 4 ranks;
* ``slurm/train.sbatch`` with ``MSL_DRY_RUN=1``: every rank prints its figures, nothing is trained;
* ``slurm/llama7b_sl.sh`` is preempted: USR1 to the batch shell mid-run -> the ranks checkpoint
  and exit 75 -> ``scontrol requeue`` -> the rerun resumes from ``latest`` -> COMPLETED with
  restart count 1 and the metrics step sequence 1..N exactly once (nothing lost, nothing repeated).

Hardware requests are overridden on the sbatch command line (as a user would); everything else
goes through the scripts' documented environment variables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = ("model.num_layers=2 model.hidden_size=64 model.ffn_hidden_size=128 model.seq_length=32 sl.rank=8 "
        "train.micro_batch_size=2 train.global_batch_size=8 eval.iters=1 eval.interval=0 eval.at_start=false")


def job_env(data, tmp: Path, iters: int, extra: str = "") -> dict:
    prefix, tokenizer = data
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(MSL_CONFIG="configs/tiny_sl.yaml", MSL_NPROC_PER_NODE="2", MSL_DATA_PREFIX=prefix,
               MSL_TOKENIZER=tokenizer, MSL_OUTPUT_DIR=str(tmp / "run"), MSL_PYTHON=sys.executable,
               MSL_NODE_EXIT_DIR=str(tmp / "node-exit"),
               MSL_OVERRIDES=f"{TINY} train.train_iters={iters} {extra}".strip(), OMP_NUM_THREADS="1")
    return env


def sbatch(script: str, env: dict, tmp: Path, *opts: str) -> int:
    cmd = ["sbatch", "--parsable", "--nodes=2", "--cpus-per-task=2", "--time=30", "-p", "debug",
           f"--output={tmp}/%x-%j.out", *opts, script]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().split(";")[0])


def slurm_wait(jid: int, timeout: int) -> tuple:
    """(JobState, ExitCode, Restarts) once final, via scripts/slurm/wait.sh (polls every second)."""
    out = subprocess.run(["bash", str(REPO / "scripts/slurm/wait.sh"), str(jid), str(timeout)], capture_output=True,
                         text=True, timeout=timeout + 60)
    state, code, restarts = out.stdout.split()
    return state, code, int(restarts) if restarts.isdigit() else restarts


def job_field(jid: int, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", str(jid)], capture_output=True, text=True).stdout
    for tok in out.split():
        if tok.startswith(field + "="):
            return tok.split("=", 1)[1]
    return ""


def train_steps(run: Path) -> list:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if rec.get("kind") == "train":
            steps.append(rec["step"])
    return steps


def job_log(tmp: Path, name: str, jid: int) -> str:
    p = tmp / f"{name}-{jid}.out"
    return p.read_text() if p.exists() else f"<no log {p}>"


def verified_checkpoint(run: Path):
    from megatron_sl.training.checkpoint import CheckpointManager

    return CheckpointManager(run).find_resumable()


def test_train_sbatch_runs_to_completion(slurm_data, tmp_path):
    t0 = time.time()
    jid = sbatch("slurm/train.sbatch", job_env(slurm_data, tmp_path, iters=6), tmp_path, "--job-name=msl-train")
    state, code, restarts = slurm_wait(jid, 420)
    log = job_log(tmp_path, "msl-train", jid)
    assert (state, code, restarts) == ("COMPLETED", "0:0", 0), log
    print(f"train.sbatch job {jid}: {time.time() - t0:.0f} s")
    run = tmp_path / "run"
    assert "on 2 node(s) [n[1-2]] x 2 rank(s)" in log and "[slurm] finished" in log, log
    assert train_steps(run) == [1, 2, 3, 4, 5, 6], log
    info = verified_checkpoint(run)
    assert info is not None and info.step == 6 and info.manifest["world_size"] == 4, log
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"


def test_train_sbatch_dry_run(slurm_data, tmp_path):
    env = job_env(slurm_data, tmp_path, iters=6)
    env["MSL_DRY_RUN"] = "1"
    jid = sbatch("slurm/train.sbatch", env, tmp_path, "--job-name=msl-dry")
    state, code, restarts = slurm_wait(jid, 300)
    log = job_log(tmp_path, "msl-dry", jid)
    assert (state, code) == ("COMPLETED", "0:0"), log
    assert "[dry-run]" in log and "world 4 = TP 1 x DP 4" in log, log
    lines = log.splitlines()
    head = next((i for i, line in enumerate(lines) if line.split()[:4] == ["rank", "tp", "dp", "params"]), None)
    assert head is not None, log
    rows = [lines[head + 1 + r].split() for r in range(4)]  # one row per rank: params ... model-state GiB
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3], log
    assert all(int(r[3].replace(",", "")) > 0 and float(r[-1]) > 0 for r in rows), log
    run = tmp_path / "run"
    assert train_steps(run) == [], log
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir()), log


def test_llama7b_script_preempted_requeued_and_resumed(slurm_data, tmp_path):
    iters = 40
    run = tmp_path / "run"
    t0 = time.time()
    jid = sbatch("slurm/llama7b_sl.sh", job_env(slurm_data, tmp_path, iters=iters), tmp_path, "--job-name=msl-7b")
    try:
        deadline = time.time() + 300
        while len(train_steps(run)) < 3:  # training is under way
            assert time.time() < deadline and job_field(jid, "JobState") in ("PENDING", "RUNNING", "CONFIGURING"), \
                job_log(tmp_path, "msl-7b", jid)
            time.sleep(0.3)
        t_sig = time.time()
        sig = subprocess.run(["scancel", "--signal=USR1", "--batch", str(jid)], capture_output=True, text=True)
        assert sig.returncode == 0, sig.stderr
        while job_field(jid, "Restarts") in ("", "0"):  # wait for the requeue
            state = job_field(jid, "JobState")
            assert state in ("RUNNING", "COMPLETING", "REQUEUED", "PENDING", "SIGNALING") and time.time() < deadline, \
                f"no requeue after USR1 (job state {state or 'purged'}; did the ranks checkpoint and exit 75?)\n" \
                + job_log(tmp_path, "msl-7b", jid)
            time.sleep(0.5)
        t_requeue = time.time()
        before = train_steps(run)
    except BaseException:
        subprocess.run(["scancel", str(jid)])
        raise
    state, code, restarts = slurm_wait(jid, 420)
    log = job_log(tmp_path, "msl-7b", jid)
    assert (state, code, restarts) == ("COMPLETED", "0:0", 1), log
    print(f"llama7b_sl.sh job {jid}: signal at +{t_sig - t0:.0f} s after step {before[:3]}, requeued +{t_requeue - t_sig:.0f} s "
          f"later at step {before[-1]}, completed at +{time.time() - t0:.0f} s")
    assert 3 <= before[-1] < iters, (before, log)
    assert "received USR1" in log and "/preempted" in log and "scontrol requeue" in log, log
    assert "worker-failed" not in log, log
    assert "restart 1 on 2 node(s)" in log, log
    steps = train_steps(run)
    assert steps == list(range(1, iters + 1)), f"lost or repeated steps: {steps}\n{log}"
    info = verified_checkpoint(run)
    assert info is not None and info.step == iters, log


def test_failed_run_is_not_requeued(slurm_data, tmp_path):
    """A rank that fails (here: a bad config value, exit 2 in every rank) ends the job FAILED and is
    not requeued; only exit 75 means "checkpointed, run me again". (Which node reports the worker
    failure varies: the first node to exit takes the rendezvous store with it, and the other
    node's agent may fail with "agent-error" before its own workers do.)"""
    jid = sbatch("slurm/train.sbatch", job_env(slurm_data, tmp_path, iters=6, extra="optim.lr=fast"), tmp_path,
                 "--job-name=msl-bad")
    state, code, restarts = slurm_wait(jid, 300)
    log = job_log(tmp_path, "msl-bad", jid)
    assert state == "FAILED" and code in ("2:0", "1:0") and restarts == 0, log
    assert "/worker-failed" in log and "/preempted" not in log and "scontrol requeue" not in log, log
