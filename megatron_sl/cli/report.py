"""``megatron-sl report RUN_DIR [RUN_DIR ...] [--output DIR]``: PNG plots (loss/perplexity, lr,
tokens/s and MFU, per-rank memory, step-time breakdown; runs overlaid) and an HTML summary
(config, parameter split, final figures, the plots) from run directories; prints the path of
``index.html``. Default output: ``RUN_DIR/report`` for one run, ``report/`` beside several runs.

  megatron-sl report runs/demo_sl
  megatron-sl report runs/demo_sl runs/demo_dense runs/demo_lowrank     # sl vs dense vs low-rank
"""

from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-sl report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (run.output_dir of each run)")
    p.add_argument("--output", default=None, help="report directory (default: see above)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from megatron_sl.training.monitoring.report import ReportError, write_report

    try:
        index = write_report(args.run_dirs, args.output)
    except ReportError as e:
        print(f"megatron-sl report: error: {e}", file=sys.stderr)
        return 2
    print(f"[report] {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
