"""``megatron-sl train --config CONFIG.yaml [section.key=value ...]``.

Outside a launcher: validate the config for ``launch.nproc_per_node`` ranks (exit 2 with one
message naming the bad key/value, nothing written, no rank started), then start the ranks with
torchrun. Inside a launcher (torchrun, ``deepspeed``, srun, mpirun): validate again for the
launcher's world size, then train this rank. ``--help-config`` lists every config key with its
type, default and description. ``--check`` validates and prints the plan only;
``--dry-run`` prints per-rank parameter and memory figures from the memory planner without
starting ranks or reading data (under a launcher rank 0 prints and every rank exits 0). Overrides and options may be mixed in any order.

Exit codes: 0 done; 1 crash; 2 bad input (config, data, run directory locked by another run,
refused resume; one message, no rank started); 3 diverged (``guard.max_bad_steps`` consecutive
NaN/inf or spiking losses; the last good checkpoint is kept); 4 stalled (a step exceeded
``guard.step_timeout_s``; stack dumps on stderr); 5 a checkpoint could not be written (e.g. disk
full; earlier checkpoints intact); 75 (EX_TEMPFAIL) stopped by SIGUSR1/SIGTERM/SIGINT after
committing a checkpoint (rerun the same command to resume); 130 aborted by a second SIGINT.

Signals: SIGUSR1, SIGTERM or SIGINT (Ctrl-C) to this process (or its process group) reach every
rank once; each finishes its step, one checkpoint is committed and the command exits 75. A second
SIGINT aborts at once without a checkpoint. SIGUSR2 saves a checkpoint and continues. The ranks
die with the launcher (even after ``kill -9``) and the launcher never exits while a rank lives.

Resume: a changed config is compared with the checkpoint's; changes to what training means are
refused unless ``--allow-config-change KEY[,KEY]`` (or SECTION) names them.
The ``deepspeed`` launcher's ``--local_rank=N`` argument is accepted and ignored (LOCAL_RANK is in
the environment).

  megatron-sl train --config configs/tiny_sl.yaml launch.nproc_per_node=2     # starts torchrun itself
  torchrun --nproc_per_node 8 -m megatron_sl.cli.train --config C.yaml        # an external launcher:
  deepspeed --num_gpus 8 --module megatron_sl.cli.train --config C.yaml       #   world size from it
  srun --ntasks-per-node 8 python -m megatron_sl.cli.train --config C.yaml
"""

from __future__ import annotations

import argparse
import os
import sys

from pathlib import Path

from megatron_sl.training.config import ConfigError, describe_keys, load_config
from megatron_sl.training.config_checks import make_plan
from megatron_sl.training.distributed import in_launcher, rank_env
from megatron_sl.training.guards import EXIT_ABORTED, EXIT_BAD_CONFIG
from megatron_sl.training.runlock import RunLock


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-sl train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="training config YAML (configs/*.yaml, shipped in the package: a path that "
                                    "does not exist is looked up there by name); defaults if omitted")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, values parsed as YAML")
    p.add_argument("--help-config", action="store_true",
                   help="print every config key (section.key) with its type, default and description; exit")
    p.add_argument("--check", action="store_true", help="validate the config and print the plan; do not train")
    p.add_argument("--dry-run", action="store_true",
                   help="print per-rank parameter/memory figures from the memory planner; no ranks, no data")
    p.add_argument("--allow-config-change", metavar="KEY[,KEY]", action="append", default=[],
                   help="accept these changed config keys (or sections) when resuming from a checkpoint")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def describe(plan) -> str:
    slc = plan.sl_config
    sl = f"rank {slc.rank}, density {slc.density}, alpha {slc.alpha}" if slc is not None else "dense"
    return (f"world {plan.world_size} = TP {plan.tp} x DP {plan.dp}; micro {plan.micro_batch_size} x GA "
            f"{plan.grad_accum} x DP {plan.dp} = global {plan.global_batch_size}; seq {plan.seq_length}; "
            f"vocab {plan.vocab_size} (tokenizer {plan.tokenizer_vocab_size}); SL: {sl}; warmup {plan.warmup_iters}; "
            f"DeepSpeed template: {plan.ds_template or 'none (per-layer updates)'}")


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before the signal handling is set up: no traceback
        print("megatron-sl train: interrupted", file=sys.stderr)
        return EXIT_ABORTED


def _allow_overrides(values) -> list:
    keys = [k.strip() for v in values for k in v.split(",") if k.strip()]
    return [f"run.allow_config_change={keys!r}"] if keys else []


def _main(argv=None) -> int:
    args = parser().parse_intermixed_args(argv)
    if args.help_config:
        print(describe_keys(), end="")
        return 0
    launched = in_launcher()
    if launched:
        from megatron_sl.training.launch import die_with_parent

        die_with_parent()
    rank = rank_env().rank if launched else 0
    if args.dry_run:
        return dry_run_main(args, launched, rank)
    overrides = [*args.overrides, *_allow_overrides(args.allow_config_change)]
    lock = None
    try:
        cfg = load_config(args.config, overrides)
        world = rank_env().world_size if launched else cfg.launch.nproc_per_node
        want_lock = not launched and not args.check
        if want_lock and Path(cfg.run.output_dir).is_dir():  # another run's files are no config error
            lock = RunLock(cfg.run.output_dir).acquire()
        plan = make_plan(cfg, world)
        if want_lock and lock is None:  # a new directory: created only once everything checked out
            lock = RunLock(cfg.run.output_dir).acquire()
    except ConfigError as e:
        if lock is not None:
            lock.release()
        if rank == 0:
            print(f"megatron-sl train: error: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    if args.check:
        if rank == 0:
            print(f"config OK: {describe(plan)}")
        return 0
    if not launched:
        from megatron_sl.training.launch import run_local_ranks

        try:
            return run_local_ranks(cfg.launch.nproc_per_node, args.config, list(overrides),
                                   cfg.launch.master_port, lock=lock)
        finally:
            if lock is not None:
                lock.release()
    from megatron_sl.training.preemption import PreemptionHandler

    handler = PreemptionHandler().install()  # before the slow imports: a stop signal during set-up is kept
    from megatron_sl.training.distributed import silence_known_warnings

    silence_known_warnings()
    from megatron_sl.training.batches import CorruptDataError
    from megatron_sl.training.checkpoint import CheckpointError
    from megatron_sl.training.guards import EXIT_CHECKPOINT_FAILED, EXIT_DIVERGED, Diverged
    from megatron_sl.training.preemption import EXIT_PREEMPTED
    from megatron_sl.training.trainer import train

    try:
        return EXIT_PREEMPTED if train(cfg, plan, handler).get("preempted") else 0
    except (ConfigError, CorruptDataError) as e:  # e.g. a locked run directory (under external launchers)
        if rank == 0:
            print(f"megatron-sl train: error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_CONFIG
    except Diverged as e:
        if rank == 0:
            print(f"megatron-sl train: error: {e}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    except CheckpointError as e:
        if rank == 0:
            print(f"megatron-sl train: error: {e}", file=sys.stderr, flush=True)
        return EXIT_CHECKPOINT_FAILED


def dry_run_main(args, launched: bool, rank: int) -> int:
    """``--dry-run``: the planner's per-rank figures; data optional, no rank started, nothing written."""
    from megatron_sl.training.dry_run import dry_run
    from megatron_sl.training.memory_plan import resolve_plan

    try:
        cfg = load_config(args.config, args.overrides)
        world = rank_env().world_size if launched else cfg.launch.nproc_per_node
        plan, note = resolve_plan(cfg, world)
    except ConfigError as e:
        if rank == 0:
            print(f"megatron-sl train: error: {e}", file=sys.stderr)
        return 2
    dry_run(cfg, plan, rank=rank, note=note)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
