"""Test worker run under ``torchrun``: several real training runs in one process group.

Usage: ``torchrun --nproc_per_node 2 -m tests.training._worker SPEC.json OUT_DIR`` (from the repo root).
SPEC is a list of cases ``{"name", "overrides": [...], "compare_with": optional case name,
"single_param_group": optional bool}``; each case runs ``megatron_sl.training.trainer.Trainer`` from
``configs/tiny_sl.yaml`` plus the overrides, exactly as ``megatron-sl train`` does inside a rank
(one torchrun launch amortises the ~15 s of imports over all cases). Rank 0 writes
``OUT_DIR/results.json``: per case the run summary plus

* ``replicated_max_abs_diff``: exact max |p - p_tp0| over TP-replicated parameters (all-gathered);
* ``param_max_abs_diff`` / ``param_max_rel_diff`` vs ``compare_with`` (final parameters, every rank);
* ``error``: the traceback if the case raised.

``resume_from: [case, step]`` first copies that case's committed checkpoint ``step_<step>`` into
this case's run directory (rank 0), so the case resumes from it exactly as a relaunch would.

``convert_from: [case, step, tp]`` instead converts that checkpoint offline (rank 0, as
``megatron-sl checkpoint convert --tp``) into this case's run directory, so the case resumes from
the layout-free form.

``single_param_group`` is a negative control: it puts all parameters but the TP-partial ones (whose
gradients the engine sums over TP in their own group) in ONE optimizer group (the configuration that
lets bitsandbytes 8-bit states drift across TP ranks). ``count_tp_allreduce`` counts, during the run,
the all-reduce calls on the TP group whose tensor is 1-D or 2-D with more than 2 elements (gradient
buckets and per-parameter gradients, not activations [s, b, h] nor norm scalars) and reports
``tp_allreduce_calls`` and the engine's own ``tp_reductions``. ``perturb_support_rank1``
shifts one SL support on rank 1 after the model is built (as a per-rank support seed would): the
start-up check must refuse to train.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]


def final_params(trainer) -> dict:
    """Every parameter in its global (TP-gathered) form, so runs on different TP layouts compare."""
    sys.path.insert(0, str(REPO / "tests"))
    from _dist import gather_sharded

    with trainer.engine.gathered_params():
        return {n: gather_sharded(p.detach().float().clone(), p, trainer.tp_group)
                for n, p in trainer.engine.module.named_parameters()}


@contextlib.contextmanager
def count_tp_allreduce(tp_group):
    """Count all-reduce calls on ``tp_group`` of gradient-like tensors (1-D/2-D, > 2 elements)."""
    counter = {"calls": 0}
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_reduce_coalesced")}

    def wrap(fn):
        def counted(tensor, *args, **kwargs):
            group = kwargs.get("group", args[1] if len(args) > 1 else None)
            tensors = tensor if isinstance(tensor, (list, tuple)) else [tensor]
            if group is tp_group and any(t.dim() <= 2 and t.numel() > 2 for t in tensors):
                counter["calls"] += 1
            return fn(tensor, *args, **kwargs)
        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(fn))
    try:
        yield counter
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def main(spec_path: str, out_dir: str) -> int:
    from megatron_sl.training import optim as optim_mod
    from megatron_sl.training.consistency import replicated_max_abs_diff
    from megatron_sl.training.config import load_config
    from megatron_sl.training.distributed import rank_env, silence_known_warnings
    from megatron_sl.training.trainer import Trainer
    from megatron_sl.training.config_checks import make_plan

    silence_known_warnings()
    cases = json.loads(Path(spec_path).read_text())
    out = Path(out_dir)
    results, params = {}, {}
    original_groups = optim_mod.param_groups
    import megatron_sl.training.trainer as trainer_mod

    original_build = trainer_mod._build_model
    for case in cases:
        name = case["name"]
        res = {}
        try:
            overrides = list(case["overrides"]) + [f"run.output_dir={out / name}", "run.progress_bar=false"]
            cfg = load_config(REPO / "configs" / "tiny_sl.yaml", overrides)
            plan = make_plan(cfg, rank_env().world_size, check_outputs=False)
            failed = None
            if rank_env().rank == 0 and (case.get("resume_from") or case.get("convert_from")):
                try:  # rank 0 prepares the run directory; a failure must not leave rank 1 in the barrier
                    if case.get("resume_from"):
                        import shutil

                        src_case, src_step = case["resume_from"]
                        name_ = f"step_{int(src_step):08d}"
                        dst = out / name / "checkpoints"
                        dst.mkdir(parents=True, exist_ok=True)
                        shutil.copytree(out / src_case / "checkpoints" / name_, dst / name_)
                        (dst / "latest").write_text(name_ + "\n")
                    else:
                        from megatron_sl.training.checkpoint.convert import convert

                        src_case, src_step, tp = case["convert_from"]
                        convert(out / src_case / "checkpoints" / f"step_{int(src_step):08d}", out / name, int(tp))
                except Exception:  # noqa: BLE001 -- reported below, after the barrier
                    failed = traceback.format_exc()
            box = [failed]
            if case.get("resume_from") or case.get("convert_from"):
                if not dist.is_initialized():  # the first case (the Trainer initialises it otherwise)
                    dist.init_process_group("gloo")
                dist.broadcast_object_list(box, src=0)
            if box[0] is not None:
                raise RuntimeError(f"preparing the run directory failed on rank 0:\n{box[0]}")
            if case.get("single_param_group"):
                def one_group(model, wd):
                    partial = [p for p in model.parameters() if optim_mod.tp_kind(p) == optim_mod.PARTIAL_GROUP]
                    rest = [p for p in model.parameters() if optim_mod.tp_kind(p) != optim_mod.PARTIAL_GROUP]
                    return [g for g in ({"params": rest, "weight_decay": wd, "name": "all"},
                                        {"params": partial, "weight_decay": wd, "name": optim_mod.PARTIAL_GROUP})
                            if g["params"]]

                optim_mod.param_groups = one_group
                import megatron_sl.training.ds_engine as dse
                dse.param_groups = optim_mod.param_groups
            if case.get("perturb_support_rank1"):
                import megatron_sl.training.trainer as trainer_mod

                build = trainer_mod._build_model

                def perturbed(cfg_, plan_, _build=build):
                    model = _build(cfg_, plan_)
                    if dist.get_rank() == 1:
                        from megatron_sl.training.consistency import support_indices

                        name, idx = support_indices(model)[0]
                        idx[0] = (idx[0] + 1) % idx[1] if idx.numel() > 1 else idx[0] + 1
                    return model

                trainer_mod._build_model = perturbed
            trainer = Trainer(cfg, plan)
            if case.get("count_tp_allreduce"):
                with count_tp_allreduce(trainer.tp_group) as counter:
                    res.update(trainer.run())
                res["tp_allreduce_calls"] = counter["calls"]
                res["tp_reductions"] = trainer.engine.tp_reductions
            else:
                res.update(trainer.run())
            from megatron.core import parallel_state as ps

            with trainer.engine.gathered_params():
                res["replicated_max_abs_diff"] = replicated_max_abs_diff(
                    trainer.engine.module, ps.get_tensor_model_parallel_group())
            params[name] = final_params(trainer)
            ref = case.get("compare_with")
            if ref is not None:
                worst = torch.zeros(2, dtype=torch.float64)
                for n, p in params[name].items():
                    q = params[ref][n]
                    d = (p - q).abs().max().double()
                    worst[0] = max(worst[0], d)
                    worst[1] = max(worst[1], d / q.abs().max().double().clamp(min=1e-12))
                dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                res["param_max_abs_diff"], res["param_max_rel_diff"] = float(worst[0]), float(worst[1])
            del trainer
        except Exception:  # noqa: BLE001 -- recorded and reported by the test
            res["error"] = traceback.format_exc()
            print(res["error"], file=sys.stderr, flush=True)
        finally:
            import megatron_sl.training.trainer as trainer_mod

            trainer_mod._build_model = original_build
            optim_mod.param_groups = original_groups
            import megatron_sl.training.ds_engine as dse
            dse.param_groups = original_groups
            gc.collect()
        results[name] = res
        if dist.is_initialized():
            dist.barrier()
    if rank_env().rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(*sys.argv[1:]))
