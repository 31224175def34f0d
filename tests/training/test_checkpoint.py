"""CheckpointManager file logic in one process (no DeepSpeed, no launcher): atomic saves under
simulated crashes at every phase, keep-last-K, manifest verification, corrupt/truncated/missing
files naming the file and falling back with a warning, refusal to start fresh over unusable
checkpoints, SL support metadata checks, and bitwise-exact resume of a small SL model whose loss
depends on every RNG stream the manager restores (torch dropout, numpy and python data draws)."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from megatron_sl.core import SLLinear
from megatron_sl.training.checkpoint import (CheckpointError, CheckpointInfo, CheckpointManager, CheckpointWarning,
                                             StateFns, TorchState, as_state_io, step_dirname)


class Net(nn.Module):
    def __init__(self, sl_seed: int = 0):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.sl = SLLinear(16, 12, rank=3, density=0.2, alpha=6.0, seed=sl_seed, name="sl")
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(12, 1)

    def forward(self, x):
        return self.out(self.drop(torch.tanh(self.sl(torch.tanh(self.inp(x))))))


def make_run(sl_seed=0, init_seed=0):
    torch.manual_seed(init_seed)
    model = Net(sl_seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched, TorchState(model, optimizer=opt, scheduler=sched)


def train_steps(model, opt, sched, n):
    """Steps whose data and dropout come from the python, numpy and torch global RNGs."""
    losses = []
    for _ in range(n):
        rows = random.randrange(3, 7)
        x = torch.from_numpy(np.random.standard_normal((rows, 6))).float()
        loss = (model(x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def seed_all(s):
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def save_n(mgr, steps, state=None):
    state = state or make_run()[3]
    for s in steps:
        mgr.save(s, state, {"step": s, "consumed_samples": 4 * s})


def test_save_layout_manifest_and_pointer(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    model, opt, sched, state = make_run()
    path = mgr.save(7, state, {"step": 7, "consumed_samples": 28, "config": {"a": 1}})
    assert path == tmp_path / "checkpoints" / "step_00000007"
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000007\n"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000007"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 7 and manifest["world_size"] == 1 and manifest["client"] == {"step": 7, "consumed_samples": 28}
    assert sorted(manifest["files"]) == ["client_state.pt", "engine/rank_00000.pt", "ranks/rank_00000.pt"]
    import hashlib
    for rel, meta in manifest["files"].items():
        data = (path / rel).read_bytes()
        assert meta["size"] == len(data) and meta["sha256"] == hashlib.sha256(data).hexdigest()
    rank = torch.load(path / "ranks" / "rank_00000.pt", weights_only=True)
    assert set(rank["rng"]) >= {"python", "numpy", "torch"}
    assert rank["sl_support"]["sl"]["index_hash"] == model.sl.get_extra_state()["index_hash"]
    info = mgr.find_resumable()
    assert info.step == 7 and info.path == path


@pytest.mark.parametrize("stage", ["engine", "after_write", "after_checksum", "before_rename"])
def test_crash_before_rename_changes_nothing(tmp_path, stage, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    model, opt, sched, state = make_run()
    mgr.save(1, state, {"step": 1})
    latest = (tmp_path / "checkpoints" / "latest").read_bytes()

    class Boom(Exception):
        pass

    if stage == "engine":
        def bad_save(d):
            (d / "partial.bin").write_bytes(b"x" * 10)
            raise Boom("disk full")
        target = StateFns(save=bad_save, load=lambda d: None)
    else:
        def fault(self, s):
            if s == stage:
                raise Boom(s)
        monkeypatch.setattr(CheckpointManager, "_fault", fault)
        target = state
    with pytest.raises(Boom):
        mgr.save(2, target, {"step": 2})
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_bytes() == latest
    assert not (root / "step_00000002").exists()
    assert (root / ".tmp-step_00000002").is_dir()
    with pytest.warns(CheckpointWarning, match="interrupted checkpoint save"):
        assert mgr.find_resumable().step == 1
    monkeypatch.undo()
    mgr.save(3, state, {"step": 3})  # the next save clears the leftover
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001", "step_00000003"]


def test_crash_after_rename_before_pointer(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path)
    state = make_run()[3]
    mgr.save(1, state, {"step": 1})

    def fault(self, s):
        if s == "after_rename":
            raise KeyboardInterrupt
    monkeypatch.setattr(CheckpointManager, "_fault", fault)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(2, state, {"step": 2})
    assert mgr.read_latest() == "step_00000001"
    # the renamed directory is complete and verifies: it is the newest resumable checkpoint
    with pytest.warns(CheckpointWarning, match="names 'step_00000001' but the newest complete checkpoint is step_00000002"):
        assert mgr.find_resumable().step == 2


def test_keep_last_k(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    save_n(mgr, [1, 2, 3, 4, 5])
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004", "step_00000005"]
    assert mgr.read_latest() == "step_00000005"
    assert [i.step for i in mgr.complete()] == [5, 4]


def _corrupt(path: Path, how: str):
    if how == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[:-7])
    elif how == "missing":
        path.unlink()


@pytest.mark.parametrize("how,words", [("flip", "is corrupt: sha256"), ("truncate", "is truncated"),
                                       ("missing", "is missing")])
def test_corrupt_latest_falls_back_with_warning_naming_file(tmp_path, how, words):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    save_n(mgr, [10, 20])
    _corrupt(tmp_path / "checkpoints" / step_dirname(20) / "engine" / "rank_00000.pt", how)
    with pytest.warns(CheckpointWarning) as rec:
        info = mgr.find_resumable()
    assert info.step == 10
    msg = " ".join(str(w.message) for w in rec)
    assert "step_00000020" in msg and "engine/rank_00000.pt" in msg and words in msg and "falling back" in msg


def test_size_only_verification_misses_flips_but_not_truncation(tmp_path):
    mgr = CheckpointManager(tmp_path, verify="size")
    save_n(mgr, [1, 2])
    f = tmp_path / "checkpoints" / step_dirname(2) / "client_state.pt"
    _corrupt(f, "flip")
    assert mgr.find_resumable().step == 2
    _corrupt(f, "truncate")
    with pytest.warns(CheckpointWarning, match="client_state.pt is truncated"):
        assert mgr.find_resumable().step == 1


def test_corrupt_manifest_is_named(tmp_path):
    mgr = CheckpointManager(tmp_path)
    save_n(mgr, [1, 2])
    (tmp_path / "checkpoints" / step_dirname(2) / "manifest.json").write_text('{"format": "megatron-sl-check')
    with pytest.warns(CheckpointWarning, match=r"step_00000002: file manifest.json is corrupt"):
        assert mgr.find_resumable().step == 1


def test_never_silently_starts_fresh(tmp_path):
    mgr = CheckpointManager(tmp_path)
    assert mgr.find_resumable() is None  # no checkpoints dir at all: a fresh run
    save_n(mgr, [3])
    _corrupt(tmp_path / "checkpoints" / step_dirname(3) / "ranks" / "rank_00000.pt", "truncate")
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match=r"none can be resumed.*ranks/rank_00000.pt is truncated"):
        mgr.find_resumable()
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError):
        mgr.resume(make_run()[3])


def test_dangling_latest_pointer_raises(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "latest").write_text("step_00000009\n")
    with pytest.raises(CheckpointError, match="latest names 'step_00000009' but no step_\\* directory exists"):
        CheckpointManager(tmp_path).find_resumable()


def test_only_an_interrupted_first_save_means_fresh_start(tmp_path):
    (tmp_path / "checkpoints" / ".tmp-step_00000005").mkdir(parents=True)
    with pytest.warns(CheckpointWarning, match="interrupted"):
        assert CheckpointManager(tmp_path).find_resumable() is None


def test_exact_resume_is_bitwise(tmp_path):
    seed_all(5)
    model, opt, sched, _ = make_run()
    straight = train_steps(model, opt, sched, 8)

    seed_all(5)
    model, opt, sched, state = make_run()
    first = train_steps(model, opt, sched, 4)
    mgr = CheckpointManager(tmp_path)
    mgr.save(4, state, {"step": 4, "consumed_samples": 16, "lr_scheduler": sched.state_dict()})
    del model, opt, sched, state

    seed_all(999)  # a relaunch: different init, different RNG positions
    model, opt, sched, state = make_run(init_seed=123)
    client = mgr.resume(state)
    assert client["step"] == 4 and client["consumed_samples"] == 16
    assert sched.last_epoch == 4
    second = train_steps(model, opt, sched, 4)
    assert first + second == straight  # bitwise: float equality of every loss


def test_sl_support_mismatch_is_refused_before_loading(tmp_path):
    mgr = CheckpointManager(tmp_path)
    save_n(mgr, [1], make_run(sl_seed=0)[3])
    model, opt, sched, state = make_run(sl_seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(CheckpointError, match=r"SL support metadata of layer 'sl' differs in \['index_hash', 'seed'\]"):
        mgr.resume(state)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was loaded


def test_world_size_mismatch_is_refused(tmp_path):
    mgr = CheckpointManager(tmp_path)
    save_n(mgr, [1])
    mf = tmp_path / "checkpoints" / step_dirname(1) / "manifest.json"
    m = json.loads(mf.read_text())
    m["world_size"] = 4
    mf.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="written by 4 ranks, this run has 1"):
        mgr.resume(make_run()[3])


def test_resave_of_same_step_keeps_intact_and_replaces_corrupt(tmp_path):
    mgr = CheckpointManager(tmp_path)
    state = make_run()[3]
    p = mgr.save(3, state, {"step": 3})
    stamp = (p / "manifest.json").read_text()
    mgr.save(3, state, {"step": 3})
    assert (p / "manifest.json").read_text() == stamp  # an intact checkpoint of that step is kept
    _corrupt(p / "client_state.pt", "flip")
    mgr.save(3, state, {"step": 3})
    assert (p / "manifest.json").read_text() != stamp
    assert mgr.find_resumable().step == 3


def test_corrupt_newest_is_replaced_when_its_step_is_saved_again(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=5)
    save_n(mgr, [1, 2, 3])
    _corrupt(tmp_path / "checkpoints" / step_dirname(3) / "client_state.pt", "truncate")
    with pytest.warns(CheckpointWarning):
        assert mgr.find_resumable().step == 2
    save_n(mgr, [3])  # the resumed run reaches step 3 again: the corrupt directory is replaced
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mgr.find_resumable().step == 3
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_00000001", "step_00000002", "step_00000003"]


def test_abandoned_steps_renamed(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=5)
    save_n(mgr, [1, 2, 3])
    with pytest.warns(CheckpointWarning, match="step_00000003 is newer than the step being saved"):
        save_n(mgr, [2])  # step 2 exists and is intact: kept; step 3 is abandoned
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names[:3] == ["latest", "step_00000001", "step_00000002"] and names[3].startswith("step_00000003.abandoned-")
    assert mgr.find_resumable().step == 2 and mgr.read_latest() == "step_00000002"


def test_crc32_checksum(tmp_path):
    mgr = CheckpointManager(tmp_path, checksum="crc32")
    save_n(mgr, [1, 2])
    m = json.loads((tmp_path / "checkpoints" / step_dirname(2) / "manifest.json").read_text())
    assert m["checksum"] == "crc32" and all(len(v["crc32"]) == 8 for v in m["files"].values())
    _corrupt(tmp_path / "checkpoints" / step_dirname(2) / "client_state.pt", "flip")
    with pytest.warns(CheckpointWarning, match="crc32 checksum does not match"):
        assert mgr.find_resumable().step == 1


@pytest.mark.parametrize("kwargs,match", [({"keep_last": 0}, "keep_last=0"), ({"keep_last": "2"}, "keep_last='2'"),
                                          ({"checksum": "md5"}, "checksum='md5'"), ({"verify": "none"}, "verify='none'")])
def test_bad_manager_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        CheckpointManager(tmp_path, **kwargs)
    assert not (tmp_path / "checkpoints").exists()


def test_bad_save_arguments_write_nothing(tmp_path):
    mgr = CheckpointManager(tmp_path)
    state = make_run()[3]
    with pytest.raises(ValueError, match="step=-1"):
        mgr.save(-1, state, {})
    with pytest.raises(ValueError, match=r"client_state\['step'\]=5 differs from step=4"):
        mgr.save(4, state, {"step": 5})
    with pytest.raises(TypeError, match="cannot checkpoint object"):
        mgr.save(4, object(), {"step": 4})
    assert not (tmp_path / "checkpoints").exists()


def test_as_state_io_recognises_adapters():
    st = TorchState(nn.Linear(2, 2))
    assert as_state_io(st) is st
    fns = StateFns(save=lambda d: None, load=lambda d: None)
    assert as_state_io(fns) is fns


def test_rng_capture_restore_includes_megatron_tracker(monkeypatch):
    from megatron.core.tensor_parallel import random as mrandom

    from megatron_sl.parallel.cpu_shims import _cpu_tracker_class
    from megatron_sl.training.checkpoint import capture_rng_state, restore_rng_state

    monkeypatch.setattr(mrandom, "_CUDA_RNG_STATE_TRACKER", _cpu_tracker_class()())
    monkeypatch.setattr(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)
    tracker = mrandom.get_cuda_rng_tracker()
    tracker.add("model-parallel-rng", 4321)

    def draw():
        with tracker.fork():
            tp = torch.rand(3)
        return tp, torch.rand(3), np.random.rand(2), random.random()

    draw()
    state = capture_rng_state()
    assert set(state) >= {"python", "numpy", "torch", "megatron_tracker"}
    first = draw()
    draw()
    restore_rng_state(state)
    again = draw()
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))
    monkeypatch.setattr(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", False)
    with pytest.raises(CheckpointError, match="tracker is not initialised"):
        restore_rng_state(state)


def test_format_versions_are_read_and_checked(tmp_path):
    """Both format tags (manifest and client state) are checked on read: another version is refused
    with a message naming the version found and the one this code reads."""
    import torch as _torch

    from megatron_sl.training.checkpoint import CLIENT_FORMAT, CLIENT_STATE, FORMAT

    mgr = CheckpointManager(tmp_path)
    save_n(mgr, [1, 2])
    ckpt = tmp_path / "checkpoints" / step_dirname(2)
    assert _torch.load(ckpt / CLIENT_STATE, weights_only=False)["format"] == CLIENT_FORMAT
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["format"] == FORMAT
    manifest["format"] = FORMAT.rsplit("/", 1)[0] + "/99"
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(CheckpointWarning, match=r"step_00000002: file manifest.json has format version "
                                               r"'megatron-sl-checkpoint/99'; this version of megatron-sl reads"):
        info = mgr.find_resumable()
    assert info.step == 1
    client = _torch.load(info.path / CLIENT_STATE, weights_only=False)
    client["format"] = "megatron-sl/1"
    _torch.save(client, info.path / CLIENT_STATE)
    with pytest.raises(CheckpointError, match=r"client_state.pt has format version 'megatron-sl/1'"):
        mgr.load(CheckpointInfo(info.path, info.step, info.manifest), make_run()[3])
