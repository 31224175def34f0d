"""``megatron-sl plan --config CONFIG.yaml [section.key=value ...] [--json] [--paper-fig3]``.

Per-rank memory of a training config, computed from the config alone
(``megatron_sl.training.memory_plan``): no rank is started, no model is built, the data files are
optional (without them the vocabulary is ``model.vocab_size`` or the preset's). The world size is
``launch.nproc_per_node`` unless ``--world-size`` is given; the device is ``launch.device``, or CUDA
for "auto" (the cluster the config is written for) unless ``--device`` is given.

Printed: the setting, one line per rank (parameters, peak, model state) and the breakdown of rank 0
at its peak (parameters, gradients, fp32 master, optimizer states, SL index, activations, buffers,
temporaries) with the peak of each phase (set-up, forward, backward, optimizer step). ``--json``
prints the same as one JSON object. ``--paper-fig3`` prints the LLaMA-7B table in the SLTrain
paper's Fig. 3 setting beside the paper's bars (no config needed). Exit codes: 0, 2 bad config.

  megatron-sl plan --config configs/llama_7b_sl.yaml
  megatron-sl plan --config configs/llama_7b_sl.yaml parallel.tensor_parallel=2 model.recompute=full --json
  megatron-sl plan --paper-fig3
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_sl.training.config import ConfigError, load_config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-sl plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="training config YAML (configs/*.yaml); defaults if omitted")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, values parsed as YAML")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--world-size", type=int, default=None, help="ranks (default: launch.nproc_per_node)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="device model (default: launch.device; 'auto' plans for CUDA)")
    p.add_argument("--paper-fig3", action="store_true",
                   help="the LLaMA-7B table in the paper's Fig. 3 setting beside the paper's bars")
    p.add_argument("--micro-batch", type=int, default=1, help="--paper-fig3: assumed micro-batch (default 1)")
    p.add_argument("--recompute", choices=("none", "selective", "full"), default="none",
                   help="--paper-fig3: assumed activation recompute (default none)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from megatron_sl.training import memory_plan as mp

    if args.paper_fig3:
        if args.micro_batch < 1:
            print(f"megatron-sl plan: error: --micro-batch={args.micro_batch} must be >= 1", file=sys.stderr)
            return 2
        rows = mp.paper_fig3(micro=args.micro_batch, recompute=args.recompute)
        if args.json:
            setting = mp.PAPER_SETTING.format(micro=args.micro_batch, recompute=args.recompute)
            print(json.dumps({"setting": setting, "rows": rows}, indent=1))
        else:
            print("\n".join(mp.format_paper_fig3(rows, args.micro_batch, args.recompute)))
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
        world = args.world_size if args.world_size is not None else cfg.launch.nproc_per_node
        if world < 1:
            raise ConfigError(f"--world-size={world} must be >= 1")
        plan, note = mp.resolve_plan(cfg, world)
    except ConfigError as e:
        print(f"megatron-sl plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        out = mp.plan_summary(cfg, plan, args.device)
        out["note"] = note
        print(json.dumps(out, indent=1))
        return 0
    s = mp.setting_from_config(cfg, plan, args.device)
    rows = mp.plan_ranks(cfg, plan, args.device)
    print(f"[plan] {mp.describe_setting(s, plan.world_size)}")
    if note:
        print(f"[plan] {note}")
    print("\n".join(mp.format_rank_table(rows)))
    print()
    print("\n".join(mp.format_breakdown(rows[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
