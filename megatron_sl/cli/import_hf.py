"""``megatron-sl import-hf HF_DIR OUTPUT``: SL weights initialised from a dense Hugging Face LLaMA.

Beyond the paper (SLTrain trains from scratch): for continued pretraining of an existing dense
model, each linear W of HF_DIR (``config.json`` + ``*.safetensors``) becomes W ≈ s·B·A + S with
B·A the rank-r truncated SVD (scaled by 1/s, split as U·√Σ and √Σ·Vᵀ) and S on the fixed random
support of ``(--seed, name)`` holding the residual W − s·B·A at those entries. Embedding, output
layer and norms are copied. The relative reconstruction error ||W − W_sl|| / ||W|| of every matrix
(and of the low-rank part alone) is printed and written to ``OUTPUT/import_report.json``.

OUTPUT is a factored SL weight directory (the ``export-hf --sl`` format); start a run from it with
``megatron-sl train ... model.init_from=OUTPUT`` and the shape/SL overrides this command prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-sl import-hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir", help="Hugging Face LLaMA directory (config.json + *.safetensors)")
    p.add_argument("output", help="factored SL weight directory to write")
    p.add_argument("--rank", type=int, default=None, help="SL rank r (default: hidden_size / 4)")
    p.add_argument("--density", type=float, default=0.03, help="sparse density delta (default 0.03)")
    p.add_argument("--alpha", type=float, default=16.0, help="scale numerator: s = alpha / r (default 16)")
    p.add_argument("--seed", type=int, default=0, help="support seed (sl.seed of the run)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT")
    return p


def read_hf(hf_dir: Path):
    from safetensors.torch import load_file

    from megatron_sl.model.hf import ExportError

    if not (hf_dir / "config.json").is_file():
        raise ExportError(f"{hf_dir} has no config.json (not a Hugging Face model directory)")
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{hf_dir} has no *.safetensors weights (save the model with save_pretrained)")
    tensors = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return json.loads((hf_dir / "config.json").read_text()), tensors


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from megatron_sl.core.config import SLConfig
    from megatron_sl.model.hf import ExportError, from_hf_dense, preset_from_hf_config
    from megatron_sl.model.param_count import count_parameters
    from megatron_sl.training.export import write_sl

    hf_dir = Path(args.hf_dir)
    try:
        cfg, tensors = read_hf(hf_dir)
        rank = args.rank if args.rank is not None else max(1, int(cfg.get("hidden_size", 4)) // 4)
        try:
            sl = SLConfig(rank=rank, density=args.density, alpha=args.alpha, seed=args.seed)
            preset = preset_from_hf_config(cfg, "imported", rank, args.density, args.alpha)
            count_parameters(preset, "sl", sl)
        except ValueError as e:
            raise ExportError(f"--rank={rank} --density={args.density} --alpha={args.alpha}: {e}") from None
        weights, report = from_hf_dense(tensors, preset, sl)
        tok = hf_dir / "tokenizer.model"
        out = write_sl(weights, args.output, tok if tok.is_file() else None, overwrite=args.overwrite,
                       extra={"source": str(hf_dir), "import_report": report})
    except ExportError as e:
        print(f"megatron-sl import-hf: error: {e}", file=sys.stderr)
        return 2
    (out / "import_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"[import-hf] {hf_dir} -> {out} (rank {rank}, density {args.density}, alpha {args.alpha}, seed {args.seed})")
    print(f"{'matrix':<48}{'shape':>14}{'low-rank err':>14}{'SL err':>10}")
    for r in report:
        print(f"{r['name']:<48}{'x'.join(map(str, r['shape'])):>14}{r['lowrank_rel_error']:>14.4f}"
              f"{r['sl_rel_error']:>10.4f}")
    p = preset
    print("[import-hf] train from it with: megatron-sl train --config CONFIG "
          f"model.num_layers={p.num_layers} model.hidden_size={p.hidden_size} model.ffn_hidden_size={p.ffn_hidden_size} "
          f"model.num_attention_heads={p.num_attention_heads} model.num_query_groups={p.num_query_groups} "
          f"model.vocab_size={weights.vocab_size} sl.rank={rank} sl.density={args.density} sl.alpha={args.alpha} "
          f"sl.seed={args.seed} model.init_from={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
