"""Hardening checks that need no training ranks (issue 12): the command line, the run-directory
lock, every pre-launch check (one message, exit 2, nothing started or written), corrupt token
data, disk full during a checkpoint (a real size-limited tmpfs), pruning of abandoned/temp
checkpoint directories, repair of ``latest``, the step guard's skip of a real optimizer step and
the watchdog's stack dump."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from training_helpers import REPO, megatron_sl_cmd, rank_env, tiny_overrides

from megatron_sl.cli.train import main as train_main
from megatron_sl.training.checkpoint import CheckpointError, CheckpointManager, CheckpointWarning, TorchState
from megatron_sl.training.config import load_config
from megatron_sl.training.guards import EXIT_STALLED, StepGuard
from megatron_sl.training.runlock import RunLock

TINY_SL = str(REPO / "configs" / "tiny_sl.yaml")


def _train(capsys, data, out, *extra):
    """``megatron-sl train`` in this process (the launcher side: it returns before starting ranks
    when a check fails); (exit code, stderr)."""
    argv = ["--config", TINY_SL, *tiny_overrides(data, out, "launch.nproc_per_node=2", *extra)]
    code = train_main(argv)
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# 9. command line
# --------------------------------------------------------------------------------------------
def test_check_anywhere_among_overrides(tiny_data, tmp_path, capsys):
    prefix, tok = tiny_data
    code = train_main(["--config", TINY_SL, f"data.prefix={prefix}", "--check", f"data.tokenizer={tok}",
                       f"run.output_dir={tmp_path / 'run'}", "launch.nproc_per_node=2"])
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("config OK")
    assert not (tmp_path / "run").exists()


def test_unquoted_numeric_split_and_empty_prefix(tiny_data, tmp_path, capsys):
    assert load_config(None, ["data.split=100"]).data.split == "100"
    code, err = _train(capsys, tiny_data, tmp_path / "run", "data.prefix=")
    assert code == 2 and "data.prefix is empty" in err and "None" not in err, err
    code, err = _train(capsys, tiny_data, tmp_path / "run", "train.train_iters=")
    assert code == 2 and "train.train_iters is empty: expected an integer" in err, err


# --------------------------------------------------------------------------------------------
# 2. one run per directory
# --------------------------------------------------------------------------------------------
def test_second_run_on_a_locked_directory_fails_at_once(tiny_data, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from megatron_sl.training.runlock import RunLock\n"
                               f"RunLock({str(run)!r}).acquire(); print('locked', flush=True); time.sleep(120)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        p = subprocess.run(megatron_sl_cmd("train", "--config", TINY_SL,
                                           *tiny_overrides(tiny_data, run, "launch.nproc_per_node=2")),
                           cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, p.stdout + p.stderr
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and f"pid {holder.pid} on host" in lines[0], p.stderr
        assert sorted(x.name for x in run.iterdir()) == [".megatron-sl.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    with RunLock(run):  # released by the kernel when the holder died
        pass


# --------------------------------------------------------------------------------------------
# 4. / 5. pre-launch checks: one line, exit 2, nothing started or written
# --------------------------------------------------------------------------------------------
def _copy_data(tiny_data, dst: Path, meta: bool = True):
    prefix, tok = tiny_data
    dst.mkdir(parents=True)
    for suffix in (".bin", ".idx") + ((".meta.json",) if meta else ()):
        shutil.copy(prefix + suffix, dst / f"d_text_document{suffix}")
    return str(dst / "d_text_document"), tok


def _one_line(code, err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_other_tokenizer_with_same_vocab_is_refused(tiny_data, tmp_path, capsys):
    from megatron_sl.training.data.tokenizer import train_bpe_tokenizer

    texts = [" ".join(reversed(line.split())) for line in Path(REPO / "README.md").read_text().splitlines()] * 20
    other = tmp_path / "other.model"
    train_bpe_tokenizer(texts, other, vocab_size=512)
    line = _one_line(*_train(capsys, (tiny_data[0], str(other)), tmp_path / "run", f"data.tokenizer={other}"))
    assert "tokenized with" in line and "other.model" in line
    # without the meta file: refused with the remedy, which then works
    data = _copy_data(tiny_data, tmp_path / "nometa", meta=False)
    line = _one_line(*_train(capsys, (data[0], str(other)), tmp_path / "run"))
    assert "--fingerprint" in line
    from megatron_sl.cli.prepare_data import main as prepare_main

    assert prepare_main(["--fingerprint", data[0], "--tokenizer-model", tiny_data[1]]) == 0
    code = train_main(["--config", TINY_SL, "--check", *tiny_overrides(data, tmp_path / "run")])
    assert code == 0, capsys.readouterr().err
    line = _one_line(*_train(capsys, (data[0], str(other)), tmp_path / "run"))
    assert "tokenized with" in line
    assert not (tmp_path / "run").exists()


def test_corrupt_token_data_is_refused_naming_the_file(tiny_data, tmp_path, capsys):
    import numpy as np

    data = _copy_data(tiny_data, tmp_path / "corrupt")
    tokens = np.memmap(data[0] + ".bin", dtype=np.uint16, mode="r+")
    tokens[100:104] = 0xFFFF
    tokens.flush()
    del tokens
    line = _one_line(*_train(capsys, data, tmp_path / "run"))
    assert "d_text_document.bin is corrupt" in line and "65535" in line, line


@pytest.mark.parametrize("override, expect", [
    ("model.seq_length=100000", "too small for one sequence of 100000+1 tokens"),
    ("launch.device=cuda", "no CUDA device"),
])
def test_prelaunch_model_and_device_checks(tiny_data, tmp_path, capsys, override, expect):
    if override.startswith("launch.device") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    line = _one_line(*_train(capsys, tiny_data, tmp_path / "run", override))
    assert expect in line, line
    assert not (tmp_path / "run").exists()


def test_output_path_under_a_regular_file(tiny_data, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    line = _one_line(*_train(capsys, tiny_data, tmp_path / "file" / "run"))
    assert "is a regular file" in line


def _mount_tmpfs(path: Path, options: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_existing_unwritable_output_dir(tiny_data, tmp_path, capsys):
    ro = tmp_path / "ro"
    if not _mount_tmpfs(ro, "ro,size=1m"):
        pytest.skip("needs root and mount for a read-only tmpfs (root ignores permission bits)")
    try:
        line = _one_line(*_train(capsys, tiny_data, ro))
        assert "is not writable" in line and "Read-only" in line, line
    finally:
        _umount(ro)


# --------------------------------------------------------------------------------------------
# 6. disk full during a checkpoint (real tmpfs)
# --------------------------------------------------------------------------------------------
def test_disk_full_checkpoint_one_message_temp_removed_earlier_intact(tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "size=4m"):
        pytest.skip("needs root and mount for a size-limited tmpfs")
    try:
        model = torch.nn.Linear(256, 512)  # ~0.5 MiB of weights, ~1.5 MiB with Adam state
        opt = torch.optim.AdamW(model.parameters())
        model(torch.randn(2, 256)).sum().backward()
        opt.step()
        mgr = CheckpointManager(disk / "run", keep_last=3)
        state = TorchState(model, optimizer=opt)
        mgr.save(1, state, {"step": 1})
        first = mgr.complete()[0]
        # a second one does not fit: refused before writing, naming the path and the sizes
        with pytest.raises(CheckpointError) as e:
            mgr.save(2, state, {"step": 2})
        msg = str(e.value)
        assert "\n" not in msg and str(mgr.root) in msg and "free" in msg and "needed" in msg, msg
        # and a write that runs out of space mid-way (no size estimate): ENOSPC, temp dir removed
        (disk / "filler").write_bytes(b"\0" * (disk_free(disk) - (200 << 10)))
        mgr2 = CheckpointManager(disk / "run2", keep_last=3)
        with pytest.raises(CheckpointError) as e:
            mgr2.save(1, state, {"step": 1})
        msg = str(e.value)
        assert "no space left on device" in msg and "needed" in msg and "\n" not in msg, msg
        assert [p.name for p in mgr2.root.iterdir()] == []
        assert sorted(p.name for p in mgr.root.iterdir()) == ["latest", "step_00000001"]
        assert mgr.verify_checkpoint(first.path).step == 1
    finally:
        _umount(disk)


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


# --------------------------------------------------------------------------------------------
# 7. pruning of abandoned / temp directories, repair of `latest`
# --------------------------------------------------------------------------------------------
def _state():
    model = torch.nn.Linear(4, 4)
    return TorchState(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_abandoned_and_temp_dirs_are_pruned(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    st = _state()
    for s in (1, 2, 3, 4):
        mgr.save(s, st, {"step": s})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        mgr.save(2, st, {"step": 2})  # as if resumed from step 2: 3 and 4 are an abandoned timeline
    names = sorted(p.name for p in mgr.root.iterdir())
    assert sum(".abandoned-" in n for n in names) == 2, names
    (mgr.root / ".tmp-step_00000009").mkdir()
    mgr.save(3, st, {"step": 3})  # passes abandoned step 3: removed; 4 still ahead: kept
    names = sorted(p.name for p in mgr.root.iterdir())
    assert [n for n in names if ".abandoned-" in n] == [n for n in names if n.startswith("step_00000004.abandoned")]
    assert len([n for n in names if ".abandoned-" in n]) == 1 and not any(n.startswith(".tmp") for n in names)
    mgr.save(4, st, {"step": 4})
    assert sorted(p.name for p in mgr.root.iterdir()) == ["latest", "step_00000003", "step_00000004"]


@pytest.mark.parametrize("damage", ["delete", "dangling"])
def test_latest_is_repaired_with_a_warning(tmp_path, damage):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    st = _state()
    for s in (1, 2):
        mgr.save(s, st, {"step": s})
    latest = mgr.root / "latest"
    if damage == "delete":
        latest.unlink()
    else:
        latest.write_text("step_00000099\n")
    with pytest.warns(CheckpointWarning, match="repairing the pointer"):
        assert mgr.find_resumable().step == 2
    assert latest.read_text() == "step_00000002\n"


# --------------------------------------------------------------------------------------------
# 8. the step guard skips a real optimizer step; the watchdog dumps stacks and exits 4
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_guard_skips_the_update_and_counts(name):
    from megatron_sl.training.config import OptimSection
    from megatron_sl.training.optim import make_optimizer

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = make_optimizer([{"params": [p]}], OptimSection(name=name, min_8bit_size=0))
    guard = StepGuard(spike_factor=3.0, spike_window=4, max_bad_steps=2)
    guard.guard_optimizer([opt])
    for loss in (1.0, 1.1, 0.9, 1.0, 1.05):  # history
        assert guard.judge(loss) is None
        p.grad = torch.randn_like(p)
        opt.step()
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)})
    for loss in (float("nan"), 50.0):
        assert guard.judge(loss) is not None
        p.grad = torch.full_like(p, float("nan"))
        opt.step()
    assert torch.equal(p, before[0])
    assert all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())
    assert guard.diverged and guard.skipped_total == 2
    assert guard.judge(1.0) is None and guard.consecutive == 0


def test_watchdog_dumps_stacks_and_exits_4():
    code = ("import time\nfrom megatron_sl.training.guards import Watchdog\n"
            "w = Watchdog(0.5).start()\nw.beat('training step 7')\n"
            "def stuck_in_collective():\n    time.sleep(30)\nstuck_in_collective()\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == EXIT_STALLED, p.stderr
    assert "no progress for" in p.stderr and "while training step 7" in p.stderr
    assert "stuck_in_collective" in p.stderr  # faulthandler's dump of the main thread


def test_rank_sigint_stops_and_a_later_second_one_aborts():
    """In a rank, SIGINT is a stop request; a duplicate delivered within the window is ignored; a
    real second one aborts with 130 and no traceback."""
    code = ("import os, signal, sys, time\nfrom megatron_sl.training.preemption import PreemptionHandler\n"
            "h = PreemptionHandler().install()\n"
            "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGINT); time.sleep(0.2)\n"
            "print('stop', h.stop_requested, h.received, flush=True)\n"
            "time.sleep(1.1); os.kill(os.getpid(), signal.SIGINT); time.sleep(5); print('not aborted')\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 130, p.stdout + p.stderr
    assert "stop True ['SIGINT']" in p.stdout and "not aborted" not in p.stdout
    assert "second SIGINT; aborting" in p.stderr and "Traceback" not in p.stderr


def test_corrupt_tokens_beyond_the_prelaunch_scan_fail_naming_the_file(tiny_data, tmp_path, monkeypatch):
    """Data too large for the pre-launch scan (simulated by a scan limit of 0 tokens): every batch's
    ids are checked against the vocabulary on the host before the embedding sees them."""
    import numpy as np

    from megatron_sl.training.batches import CorruptDataError, collate
    from megatron_sl.training.data import build_datasets, datasets

    prefix, tok = _copy_data(tiny_data, tmp_path / "big")
    tokens = np.memmap(prefix + ".bin", dtype=np.uint16, mode="r+")
    tokens[5000:5004] = 0xFFFF
    tokens.flush()
    del tokens
    monkeypatch.setattr(datasets, "MAX_TOKENS_TO_SCAN", 0)
    train, _ = build_datasets(prefix, tok, 32, split="100", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(CorruptDataError, match=r"big/d_text_document\.bin is corrupt: sample \d+ holds (tokens|labels) "
                                               r"id 65535 but the tokenizer has 512 pieces"):
        for start in range(0, len(train) - 4, 4):
            collate(train, start, 4, "cpu", 512)
