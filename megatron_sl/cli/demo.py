"""``megatron-sl demo``: the README's main job, end to end on a CPU box in a few minutes.

1. prepare the demo corpus (real English prose from a registry package, cached under ``--data-dir``)
   and its sentencepiece BPE through ``megatron_sl.training.data``;
2. train the tiny SL preset (the shipped ``configs/tiny_sl.yaml``) on 2 gloo ranks via torchrun
   (OMP_NUM_THREADS=1 per rank), with validation before, during and after training;
3. print the validation perplexity before and after, the throughput, where the checkpoint is, and one
   greedy sample from the trained model (``megatron-sl generate``; ``--sample-tokens 0`` skips it);
4. write the run report (``<run>/report/index.html`` with its PNG plots, as ``megatron-sl report``)
   and print its path.

Baselines from the same command: ``megatron-sl demo variant=dense`` (full rank) and
``megatron-sl demo variant=lowrank`` (delta = 0). Any training key can be overridden as
``section.key=value`` (e.g. ``train.train_iters=50``). The config is checked before the data is
fetched and again, with the data paths, before any rank starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_sl.constants import DEFAULT_CONFIG, DEFAULT_DATA_DIR, DEFAULT_RUNS_DIR, VARIANTS
from megatron_sl.resources import config_dir
from megatron_sl.training.config import ConfigError, load_config
from megatron_sl.training.config_checks import make_plan


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-sl demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*",
                   help="variant=sl|dense|lowrank and/or section.key=value training overrides")
    p.add_argument("--config", default=str(config_dir() / DEFAULT_CONFIG),
                   help=f"training config (default: the shipped configs/{DEFAULT_CONFIG})")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="where the corpus and the prepared dataset are cached")
    p.add_argument("--output-dir", default=None, help=f"run directory (default: {DEFAULT_RUNS_DIR}/demo_<variant>)")
    p.add_argument("--source", action="append", default=None,
                   help="corpus source(s) to try in order (default: the data package's list; 'pydoc' is a "
                        "small offline corpus for smoke tests)")
    p.add_argument("--vocab-size", type=int, default=8000, help="BPE vocabulary of the demo tokenizer")
    p.add_argument("--sample-prompt", default="It is a truth universally acknowledged",
                   help="prompt of the greedy sample printed after training")
    p.add_argument("--sample-tokens", type=int, default=40, help="tokens of that sample (0: no sample)")
    return p


def split_overrides(items):
    variant, rest = None, []
    for item in items:
        if item.startswith("variant="):
            variant = item.split("=", 1)[1]
            if variant not in VARIANTS:
                raise ConfigError(f"variant={variant!r} is not one of {list(VARIANTS)}")
        else:
            rest.append(item)
    return variant, rest


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        variant, overrides = split_overrides(args.overrides)
        cfg = load_config(args.config, overrides)  # unknown keys / bad types: before fetching anything
        variant = variant or cfg.model.variant
        out = args.output_dir or f"{DEFAULT_RUNS_DIR}/demo_{variant}"
        base = [f"model.variant={variant}", f"run.output_dir={out}", "run.overwrite=true"]
        cfg = load_config(args.config, base + overrides)
        make_plan(cfg, cfg.launch.nproc_per_node, check_inputs=False)
    except ConfigError as e:
        print(f"megatron-sl demo: error: {e}", file=sys.stderr)
        return 2

    from megatron_sl.corpus import prepare_demo_data
    from megatron_sl.training.data import DataError

    print(f"[data] preparing the demo corpus under {args.data_dir}/ (fetched once, then cached)", flush=True)
    kwargs = {"sources": tuple(args.source)} if args.source else {}
    try:
        prepared = prepare_demo_data(args.data_dir, vocab_size=args.vocab_size, **kwargs)
    except DataError as e:
        print(f"megatron-sl demo: error: {e}", file=sys.stderr)
        return 2
    print(f"[data] {prepared.summary()}", flush=True)

    overrides = base + [f"data.prefix={prepared.prefix}", f"data.tokenizer={prepared.tokenizer_model}"] + overrides
    try:
        cfg = load_config(args.config, overrides)
        plan = make_plan(cfg, cfg.launch.nproc_per_node)
    except ConfigError as e:
        print(f"megatron-sl demo: error: {e}", file=sys.stderr)
        return 2
    print(f"[demo] training the {cfg.model.preset} {variant} model on {plan.world_size} ranks "
          f"({cfg.train.train_iters} steps of {plan.tokens_per_step} tokens) -> {out}", flush=True)

    from megatron_sl.training.launch import run_local_ranks

    rc = run_local_ranks(cfg.launch.nproc_per_node, args.config, overrides, cfg.launch.master_port)
    if rc != 0:
        print(f"megatron-sl demo: training failed (exit code {rc})", file=sys.stderr)
        return rc
    summary = json.loads((Path(out) / "summary.json").read_text())
    before, after = summary.get("initial_val_ppl"), summary.get("final_val_ppl")
    print(f"[demo] {variant}: validation perplexity {before:.2f} before -> {after:.2f} after training "
          f"({summary['steps']} steps, {summary['tokens']:,} tokens, {summary['tokens_per_s']:,.0f} tokens/s, "
          f"{summary['params']:,} parameters)" if before is not None and after is not None
          else f"[demo] {variant}: trained {summary['steps']} steps")
    print(f"[demo] checkpoint: {summary['checkpoint']}; metrics: {out}/metrics.jsonl", flush=True)
    from megatron_sl.training.monitoring.report import write_report

    print(f"[demo] report (plots + HTML summary): {write_report([out])}", flush=True)
    if args.sample_tokens > 0:
        from megatron_sl.cli.generate import sample_text
        from megatron_sl.training.export import read_checkpoint

        text = sample_text(read_checkpoint(summary["checkpoint"]), args.sample_prompt, args.sample_tokens)
        print(f"[demo] greedy sample: {text!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
