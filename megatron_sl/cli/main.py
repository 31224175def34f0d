"""``megatron-sl`` entry point: dispatches subcommands to their modules, imported lazily so
``megatron-sl --help`` stays fast. Each subcommand module exposes ``main(argv) -> int``."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "demo": ("megatron_sl.cli.demo", "the embedded default: prepare data, train the tiny SL preset, report perplexity"),
    "train": ("megatron_sl.cli.train", "train from a YAML config with key=value overrides"),
    "prepare-data": ("megatron_sl.cli.prepare_data", "JSONL -> sentencepiece -> megatron indexed .bin/.idx"),
    "presets": ("megatron_sl.cli.presets", "print each LLaMA preset's parameter counts"),
    "report": ("megatron_sl.cli.report", "PNG plots + HTML summary of run directories (runs overlaid)"),
    "plan": ("megatron_sl.cli.plan", "per-rank memory of a config, from the config alone (no ranks, no data)"),
    "export-hf": ("megatron_sl.cli.export_hf", "a checkpoint as a Hugging Face LLaMA directory (or --sl: factored)"),
    "generate": ("megatron_sl.cli.generate", "sample from a checkpoint (greedy or top-p)"),
    "checkpoint": ("megatron_sl.cli.checkpoint", "checkpoint tools: convert (reshard offline to another TP / DP)"),
    "import-hf": ("megatron_sl.cli.import_hf", "initialise SL weights from a dense Hugging Face LLaMA (SVD + residual)"),
}


def usage() -> str:
    lines = ["usage: megatron-sl <command> [args]", "", "commands:"]
    lines += [f"  {name:<14}{help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def strip_launcher_args(argv: list) -> list:
    """Drop ``--local_rank=N`` / ``--local-rank N``, which the ``deepspeed`` launcher appends to
    every rank's argv (the rank comes from the LOCAL_RANK environment variable instead)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--local_rank", "--local-rank"):
            skip = True
        elif not a.startswith(("--local_rank=", "--local-rank=")):
            out.append(a)
    return out


def main(argv=None) -> int:
    argv = strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"megatron-sl: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
