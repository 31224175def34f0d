"""Hardening with real 2-rank runs (issue 12): stop signals to the ``megatron-sl`` command, kill -9 of
its process group, resume that refuses silent config changes and applies allowed ones, NaN
divergence stop with the last good checkpoint kept, and bitwise resume of 8-bit AdamW under ZeRO-2
with TP=2 and of the per-layer engine with GA=2 (plus divergence under per-layer and ZeRO-3) in
one torchrun launch of ``_worker.py``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from training_helpers import REPO, megatron_sl_cmd, rank_env, run, tiny_overrides

from megatron_sl.training.launch import descendants
from megatron_sl.training.schedule import WarmupCosine

TINY_SL = str(REPO / "configs" / "tiny_sl.yaml")
QUIET = ["eval.interval=0", "eval.iters=1", "eval.at_start=false", "launch.nproc_per_node=2"]


def _cmd(data, out, *extra):
    return megatron_sl_cmd("train", "--config", TINY_SL, *tiny_overrides(data, out, *QUIET, *extra))


def _records(out: Path, kind="train") -> list:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(str.strip, lines)) if r.get("kind") == kind]


_STARTED = []


@pytest.fixture(autouse=True)
def _no_leftover_runs():
    """A failing test must not leave a long run behind: kill the process group of every launcher
    it started (the ranks die with it)."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def _start(cmd):
    proc = subprocess.Popen(cmd, cwd=REPO, env=rank_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    _STARTED.append(proc)
    return proc


def _wait_for_step(proc, out: Path, step: int, timeout=300):
    deadline = time.time() + timeout
    while True:
        if (out / "metrics.jsonl").exists() and any(r["step"] >= step for r in _records(out)):
            return
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)


def _running(pid) -> bool:
    """The process exists and has not exited (a zombie waiting for its parent's reap has exited; a
    rank re-parented to a container's PID 1 can stay a zombie for a while)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:].split()[0] != b"Z"


def _ranks_of(pid) -> set:
    out = set()
    for p in descendants(pid):
        cmdline = Path(f"/proc/{p}/cmdline").read_bytes()
        if b"megatron_sl.cli.train" in cmdline and b"megatron_sl.training.preemption" not in cmdline:
            out.add(p)
    return out


# --------------------------------------------------------------------------------------------
# 1. signals
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_stop_signals_to_the_command_checkpoint_and_exit_75(tiny_data, tmp_path):
    out = tmp_path / "run"
    cmd = _cmd(tiny_data, out, "train.train_iters=100000")
    last = 0
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        proc = _start(cmd)
        _wait_for_step(proc, out, last + 2)
        ranks = _ranks_of(proc.pid)
        assert len(ranks) == 2
        os.kill(proc.pid, sig)  # the command the user ran, not the internal wrapper
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 75, f"{sig.name}: {stdout}\n{stderr}"
        assert "Traceback" not in stderr, stderr
        assert not any(_running(p) for p in ranks), f"{sig.name}: ranks outlived the launcher"
        step = int((out / "checkpoints" / "latest").read_text().strip()[5:])
        recs = _records(out)
        assert step == recs[-1]["step"] > last, (sig.name, step, recs[-3:])
        assert _records(out, "preempted")[-1]["step"] == step
        assert stdout.count("[ckpt] saved") == 1
        if last:
            assert f"resumed from {out / 'checkpoints' / ('step_%08d' % last)}" in stdout
        last = step
    # a second Ctrl-C aborts at once, without a checkpoint
    proc = _start(cmd)
    _wait_for_step(proc, out, last + 2)
    ranks = _ranks_of(proc.pid)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode in (130, 75), stdout + stderr
    assert "Traceback" not in stderr, stderr
    assert not any(_running(p) for p in ranks), "ranks outlived the launcher"


@pytest.mark.slow
def test_kill9_of_the_process_group_leaves_no_rank(tiny_data, tmp_path):
    out = tmp_path / "run"
    proc = _start(_cmd(tiny_data, out, "train.train_iters=100000"))
    _wait_for_step(proc, out, 2)
    ranks = _ranks_of(proc.pid)
    assert len(ranks) == 2
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    deadline = time.time() + 10
    while any(_running(p) for p in ranks):
        assert time.time() < deadline, f"orphaned ranks {ranks}"
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------
# 3. resume compares configs
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_refuses_meaning_changes_and_applies_allowed_ones(tiny_data, tmp_path):
    out = tmp_path / "run"
    base = ["train.train_iters=4", "optim.warmup_iters=1"]
    first = run(_cmd(tiny_data, out, *base))
    assert first.returncode == 0, first.stdout + first.stderr
    assert json.loads((out / "checkpoints" / "step_00000004" / "run_config.json").read_text())["world_size"] == 2
    saved = {n: (out / n).read_bytes() for n in ("config.yaml", "ds_config.json")}
    # (a changed TP / DP / ZeRO stage is resharded, see test_reshard.py)
    for extra in (["train.seed=99"], ["data.split=80,20,0"], ["sl.rank=4"]):
        p = run(_cmd(tiny_data, out, *base, *extra))
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 2 and len(lines) == 1, (extra, p.stdout + p.stderr)
        assert extra[0].split("=")[0] in lines[0], lines[0]
        assert "[train]" not in p.stdout  # no rank started
        assert {n: (out / n).read_bytes() for n in saved} == saved  # nothing rewritten
    # allowed: a new peak LR and a longer run take effect (the LR really changes after resume)
    p = run(_cmd(tiny_data, out, "train.train_iters=8", "optim.warmup_iters=1", "optim.lr=1e-2"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "config change accepted: optim.lr: 0.002 -> 0.01" in p.stdout
    sched = WarmupCosine(1e-2, 1, 8, 0.1)
    after = [r for r in _records(out) if r["step"] > 4]
    assert [r["step"] for r in after] == [5, 6, 7, 8]
    assert [r["lr"] for r in after] == pytest.approx([sched.lr_at(s - 1) for s in (5, 6, 7, 8)], rel=1e-12)
    # a protected change named by --allow-config-change goes through
    p = run(_cmd(tiny_data, out, "train.train_iters=9", "optim.warmup_iters=1", "optim.lr=1e-2", "train.seed=99")
            + ["--allow-config-change", "train.seed"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "config change accepted: train.seed: 1234 -> 99" in p.stdout


# --------------------------------------------------------------------------------------------
# 8. divergence: bad steps skipped with the optimizer untouched, stop with exit 3, last good kept
# --------------------------------------------------------------------------------------------
def _tensors(obj, prefix=""):
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k not in ("param_groups", "lr_scheduler", "ds_config", "ds_version", "global_steps", "global_samples",
                         "skipped_steps", "iteration"):
                yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def _engine_state(ckpt: Path) -> dict:
    out = {}
    for f in sorted((ckpt / "engine" / "ds").glob("*.pt")):
        for k, t in _tensors(torch.load(f, map_location="cpu", weights_only=False)):
            out[f.name + k] = t.reshape(-1).contiguous().view(torch.uint8)  # bitwise, NaN-safe
    return out


@pytest.mark.slow
def test_divergence_skips_steps_and_stops_with_last_good_checkpoint_kept(tiny_data, tmp_path):
    out = tmp_path / "run"
    p = run(_cmd(tiny_data, out, "train.train_iters=20", "optim.lr=1e30", "optim.warmup_iters=0",
                 "deepspeed.zero_stage=2", "run.save_interval=1", "run.keep_last=1", "guard.max_bad_steps=3",
                 "guard.spike_factor=10"))
    assert p.returncode == 3, p.stdout + p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("megatron-sl train: error:")]
    assert len(errors) == 1 and "3 consecutive bad steps up to step 4" in errors[0], p.stderr
    assert "step_00000001 (kept outside run.keep_last)" in errors[0]
    recs = _records(out)
    assert [r["skipped"] for r in recs] == [False, True, True, True]
    assert recs[-1]["skipped_steps"] == 3
    ck = out / "checkpoints"
    assert sorted(x.name for x in ck.iterdir()) == ["last_good", "latest", "step_00000001", "step_00000003"]
    # steps 2 and 3 were skipped: parameters and ZeRO-2 optimizer state are bitwise those of step 1
    s1, s3 = _engine_state(ck / "step_00000001"), _engine_state(ck / "step_00000003")
    assert s1.keys() == s3.keys() and len(s1) > 3
    assert [k for k in s1 if not torch.equal(s1[k], s3[k])] == []


# --------------------------------------------------------------------------------------------
# resume of 8-bit AdamW under ZeRO-2 with TP=2, and of per-layer updates with GA=2 (bitwise);
# divergence under per-layer and ZeRO-3. One torchrun launch.
# --------------------------------------------------------------------------------------------
RESUME = ["train.train_iters=6", "run.save_interval=3", "eval.interval=0", "eval.iters=1", "eval.at_start=false"]
Z2TP2 = ["deepspeed.zero_stage=2", "parallel.tensor_parallel=2", "optim.name=adamw8bit", "optim.min_8bit_size=0"]
PLGA2 = ["optim.per_layer=true", "deepspeed.zero_stage=0", "train.global_batch_size=16"]
DIVERGE = ["train.train_iters=10", "optim.lr=1e30", "optim.warmup_iters=0", "guard.max_bad_steps=2",
           "guard.spike_factor=10", "eval.interval=0", "eval.iters=0", "eval.at_start=false", "data.split=100"]


@pytest.fixture(scope="module")
def worker_runs(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("hardening")
    prefix, tok = tiny_data
    common = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.seq_length=32",
              "sl.rank=8", f"data.prefix={prefix}", f"data.tokenizer={tok}"]
    spec = [
        {"name": "z2tp2_straight", "overrides": [*common, *RESUME, *Z2TP2]},
        {"name": "z2tp2_resumed", "overrides": [*common, *RESUME, *Z2TP2], "resume_from": ["z2tp2_straight", 3]},
        {"name": "pl_ga2_straight", "overrides": [*common, *RESUME, *PLGA2]},
        {"name": "pl_ga2_resumed", "overrides": [*common, *RESUME, *PLGA2], "resume_from": ["pl_ga2_straight", 3]},
        {"name": "pl_ga2_diverge", "overrides": [*common, *DIVERGE, *PLGA2]},
        {"name": "z3_diverge", "overrides": [*common, *DIVERGE, "deepspeed.zero_stage=3"]},
    ]
    (out / "spec.json").write_text(json.dumps(spec))
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(REPO / "tests" / "training" / "_worker.py"), str(out / "spec.json"), str(out)], timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("case", ["z2tp2", "pl_ga2"])
def test_resume_is_bitwise(worker_runs, case):
    straight, resumed = worker_runs[f"{case}_straight"], worker_runs[f"{case}_resumed"]
    assert "error" not in straight and "error" not in resumed, (straight.get("error"), resumed.get("error"))
    assert resumed["resumed_from_step"] == 3 and len(straight["losses"]) == 6
    assert resumed["losses"] == straight["losses"][3:]  # bitwise-equal floats


@pytest.mark.slow
@pytest.mark.parametrize("case", ["pl_ga2_diverge", "z3_diverge"])
def test_divergence_stops_under_per_layer_and_zero3(worker_runs, case):
    err = worker_runs[case].get("error", "")
    assert "Diverged: training diverged: 2 consecutive bad steps up to step 3" in err, err[-2000:]
