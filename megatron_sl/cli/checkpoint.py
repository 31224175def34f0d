"""``megatron-sl checkpoint convert CHECKPOINT --tp N OUT_DIR``: reshard a training checkpoint offline.

CHECKPOINT is a ``<run>/checkpoints/step_XXXXXXXX`` directory (or a run directory: its ``latest``)
written by ``megatron-sl train`` at any TP / DP size with any ZeRO stage (0-3) or the per-layer engine
(or an earlier conversion). It is verified, merged over its TP and ZeRO shards and written into the run
directory OUT_DIR (``OUT_DIR/checkpoints/step_XXXXXXXX``) in the layout-free form, recorded for TP=N
(and ``--dp``, default the source's DP): ``megatron-sl train ... parallel.tensor_parallel=N
run.output_dir=OUT_DIR`` resumes from it, and so does any other valid layout. Model weights, fp32
masters, AdamW moments (8-bit states dequantized per block), step, LR schedule position and data
position are carried; per-rank RNG streams are not.
"""

from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-sl checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("convert", help="reshard a checkpoint offline into a new run directory (layout-free form)")
    c.add_argument("checkpoint", help="<run>/checkpoints/step_XXXXXXXX (or a run directory: its latest checkpoint)")
    c.add_argument("out_dir", help="run directory to write (its checkpoints/ must be empty unless --overwrite)")
    c.add_argument("--tp", type=int, required=True, help="tensor-parallel size the converted checkpoint is recorded for")
    c.add_argument("--dp", type=int, default=None, help="data-parallel size recorded (default: the source's)")
    c.add_argument("--overwrite", action="store_true", help="replace OUT_DIR/checkpoints")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from megatron_sl.training.checkpoint.convert import convert
    from megatron_sl.training.checkpoint.errors import CheckpointError
    from megatron_sl.training.config import ConfigError

    try:
        _, line = convert(args.checkpoint, args.out_dir, args.tp, args.dp, overwrite=args.overwrite)
    except (CheckpointError, ConfigError) as e:
        print(f"megatron-sl checkpoint convert: error: {e}", file=sys.stderr)
        return 2
    print(f"[checkpoint convert] {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
