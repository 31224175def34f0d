"""CheckpointManager with a real DeepSpeed ZeRO-2 engine on 2 gloo ranks (torchrun): per-rank ZeRO
shards in the manifest, checksums split over the ranks, and exact resume after ``kill -9`` of one
rank: 6 steps straight == 3 steps, checkpoint, one more (lost) step, rank 1 killed, relaunch,
resume, 3 steps — every loss bitwise equal (fp32, dropout and data drawn from the RNGs the
manager restores)."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS, HALF = 6, 3


def _torchrun(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_deepspeed_zero2_exact_resume_after_kill9(tmp_path):
    first = _torchrun("first", str(tmp_path))
    assert first.returncode != 0, "rank 1 was meant to be killed with SIGKILL"
    assert (tmp_path / "straight.json").exists() and (tmp_path / "first.json").exists(), first.stdout + first.stderr
    assert "exitcode  : -9" in first.stdout + first.stderr
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "step_00000003" / "manifest.json").read_text())
    files = set(manifest["files"])
    assert {"engine/ds/mp_rank_00_model_states.pt", "engine/ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "engine/ds/zero_pp_rank_1_mp_rank_00_optim_states.pt", "ranks/rank_00000.pt", "ranks/rank_00001.pt",
            "client_state.pt"} <= files, files
    assert manifest["world_size"] == 2 and manifest["client"] == {"step": 3, "consumed_samples": 24}

    second = _torchrun("second", str(tmp_path))
    assert second.returncode == 0, second.stdout + second.stderr
    straight = json.loads((tmp_path / "straight.json").read_text())
    got = json.loads((tmp_path / "first.json").read_text())[:HALF] + json.loads((tmp_path / "second.json").read_text())
    assert len(straight) == STEPS and got == straight  # bitwise-equal float losses


# --------------------------------------------------------------------------------------------
# the ranks
# --------------------------------------------------------------------------------------------
def _build(init_seed: int):
    import torch
    from torch import nn

    from megatron_sl.core import SLLinear
    from megatron_sl.training.distributed import import_deepspeed

    deepspeed = import_deepspeed("cpu")
    torch.manual_seed(init_seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), SLLinear(16, 16, rank=4, density=0.25, alpha=8.0, name="sl"),
                          nn.Dropout(0.2), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
           "zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg,
                                      lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)))
    return engine


def _steps(engine, n):
    import numpy as np
    import torch

    losses = []
    for _ in range(n):
        scale = random.choice([0.5, 1.0, 2.0])
        x = torch.from_numpy(np.random.standard_normal((4, 8))).float() * scale
        loss = (engine(x) ** 2).mean()
        engine.backward(loss)
        engine.step()
        t = loss.detach().clone()
        torch.distributed.all_reduce(t)
        losses.append(t.item())
    return losses


def _seed(rank):
    import numpy as np
    import torch

    random.seed(rank)
    np.random.seed(rank)
    torch.manual_seed(rank)


def worker(phase: str, out: Path) -> int:
    import torch.distributed as dist

    from megatron_sl.training.checkpoint import CheckpointManager

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mgr = CheckpointManager(out / "run", keep_last=2)
    if phase == "first":
        _seed(rank)
        straight = _steps(_build(0), STEPS)
        _seed(rank)
        engine = _build(0)
        losses = _steps(engine, HALF)
        mgr.save(HALF, engine, {"step": HALF, "consumed_samples": HALF * 8})
        losses += _steps(engine, 1)  # work after the checkpoint, lost with the crash
        if rank == 0:
            (out / "straight.json").write_text(json.dumps(straight))
            (out / "first.json").write_text(json.dumps(losses))
        dist.barrier()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        import time
        time.sleep(60)  # torchrun tears rank 0 down after rank 1 dies
        return 0
    _seed(100 + rank)  # the relaunch: other RNG positions and another init
    engine = _build(7)
    client = mgr.resume(engine)
    assert client["step"] == HALF, client
    losses = _steps(engine, STEPS - HALF)
    if rank == 0:
        (out / "second.json").write_text(json.dumps(losses))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1], Path(sys.argv[2])))
