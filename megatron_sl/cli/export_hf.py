"""``megatron-sl export-hf CHECKPOINT OUT_DIR``: a training checkpoint as a Hugging Face LLaMA directory.

CHECKPOINT is a ``<run>/checkpoints/step_XXXXXXXX`` directory (or a run directory: its ``latest``)
written by ``megatron-sl train`` at any TP size, with any ZeRO stage (at ZeRO-3 the weights are the
fp32 masters cut from the partitioned optimizer shards) or the per-layer engine. Every SL matrix is
gathered over TP and multiplied out, W = s·B·A + S; q/k/v and gate/up are split back to
``q_proj``/``k_proj``/``v_proj`` and ``gate_proj``/``up_proj``. OUT_DIR gets ``model.safetensors``,
``config.json`` (``LlamaConfig``; the vocabulary is the model's padded one) and the sentencepiece
tokenizer, loadable with ``transformers.LlamaForCausalLM.from_pretrained(OUT_DIR)``.

``--sl`` keeps the factored form instead (B, A, the sparse values and their global flat index, plus
the support seed/density/name of each matrix in ``sl_config.json``) for continued SL training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-sl export-hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="<run>/checkpoints/step_XXXXXXXX (or a run directory: its latest checkpoint)")
    p.add_argument("out_dir", help="output directory (created; must be empty unless --overwrite)")
    p.add_argument("--sl", action="store_true", help="write the factored SL form (B, A, values, index) instead")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the dense weights")
    p.add_argument("--tokenizer", default=None,
                   help="sentencepiece .model to ship (default: the checkpoint's data.tokenizer)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    import torch

    from megatron_sl.model.hf import ExportError
    from megatron_sl.training.export import read_checkpoint, write_hf, write_sl

    try:
        ckpt = read_checkpoint(args.checkpoint)
        tok = Path(args.tokenizer) if args.tokenizer else ckpt.tokenizer
        if not tok.is_file():
            raise ExportError(f"tokenizer {str(tok)!r} does not exist (pass --tokenizer PATH)")
        if args.sl:
            if ckpt.weights.sl_config is None:
                raise ExportError(f"--sl: {ckpt.path} is a dense-variant checkpoint; it has no factored form")
            out = write_sl(ckpt.weights, args.out_dir, tok, overwrite=args.overwrite,
                           extra={"source_checkpoint": str(ckpt.path), "step": ckpt.step, "variant": ckpt.cfg.model.variant})
        else:
            out = write_hf(ckpt.weights, args.out_dir, tok, overwrite=args.overwrite,
                           dtype=getattr(torch, DTYPES[args.dtype]))
    except ExportError as e:
        print(f"megatron-sl export-hf: error: {e}", file=sys.stderr)
        return 2
    kind = "factored SL weights" if args.sl else "Hugging Face LLaMA"
    print(f"[export-hf] {ckpt.path} (step {ckpt.step}, TP={ckpt.tp}, {ckpt.cfg.model.variant}) -> {out} ({kind})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
