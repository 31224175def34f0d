"""``megatron-sl train --dry-run``: the per-rank parameter and memory figures of a run, from the
memory planner (``memory_plan``), without starting ranks, building the model or reading data.

Outside a launcher the launching process prints the plan for ``launch.nproc_per_node`` ranks; under
a launcher (torchrun, srun, ...) every rank computes it for the launcher's world size, rank 0 prints
and all ranks return 0 (no process group is created, so nothing waits on a peer).

Output: a ``[dry-run]`` line with the setting (``world N = TP t x DP d`` ...), a header line
``rank tp dp params ...`` and one row per rank whose last column is that rank's model-state GiB
(parameters, gradients, fp32 master, optimizer states, SL index); the peak GiB column adds
activations, buffers and temporaries at the worst phase (see ``megatron-sl plan`` for the breakdown).
"""

from __future__ import annotations

from typing import List, Optional

from .config import TrainConfig
from .memory_plan import RankPlan, describe_setting, format_rank_table, plan_ranks, setting_from_config
from .config_checks import Plan


def dry_run(cfg: TrainConfig, plan: Plan, rank: int = 0, note: Optional[str] = None) -> List[RankPlan]:
    """Plan every rank of ``plan``'s world; rank ``rank`` == 0 prints. Returns the rows."""
    device = None if cfg.launch.device == "auto" else cfg.launch.device
    rows = plan_ranks(cfg, plan, device)
    if rank == 0:
        s = setting_from_config(cfg, plan, device)
        print(f"[dry-run] {describe_setting(s, plan.world_size)}; memory from the planner "
              f"(megatron-sl plan --config ... for the breakdown)")
        if note:
            print(f"[dry-run] {note}")
        print("\n".join(format_rank_table(rows)), flush=True)
    return rows
