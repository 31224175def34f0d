"""``megatron-sl generate CHECKPOINT --prompt "..."``: sample from a trained model for a quick look.

CHECKPOINT is a ``<run>/checkpoints/step_XXXXXXXX`` directory (or a run directory: its latest
checkpoint) of any TP size; the weights are gathered and the model is rebuilt at TP=1 in this
process (a one-rank gloo group), on the CPU or, with ``--device cuda``, one GPU. Greedy by default;
``--top-p P --temperature T`` samples (reproducibly with ``--seed``). Padding entries of the
vocabulary are never sampled. Prints the prompt followed by the continuation.
"""

from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-sl generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="<run>/checkpoints/step_XXXXXXXX (or a run directory)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    mode.add_argument("--top-p", type=float, default=None, help="nucleus sampling with this probability mass")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --top-p)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: the checkpoint's data.tokenizer)")
    return p


def check_args(args) -> None:
    from megatron_sl.model.hf import ExportError

    if args.max_new_tokens < 0:
        raise ExportError(f"--max-new-tokens={args.max_new_tokens} must be >= 0")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ExportError(f"--top-p={args.top_p} must be in (0, 1]")
    if not args.temperature > 0:
        raise ExportError(f"--temperature={args.temperature} must be > 0")


def sample_text(ckpt, prompt: str, max_new_tokens: int, *, top_p=None, temperature=1.0, seed=0, device="cpu",
                tokenizer=None) -> str:
    """The prompt and its continuation by the model of ``ckpt`` (a ``LoadedCheckpoint``)."""
    import torch

    from megatron_sl.model.generate import generate
    from megatron_sl.training.data import load_tokenizer
    from megatron_sl.training.export import single_process_model

    tok = load_tokenizer(tokenizer or ckpt.tokenizer)
    model = single_process_model(ckpt.weights, ckpt.cfg.model.variant, device)
    gen = torch.Generator().manual_seed(seed)
    ids = generate(model, tok.encode(prompt) or [tok.eos], max_new_tokens, greedy=top_p is None,
                   top_p=top_p or 1.0, temperature=temperature, generator=gen, eos_id=tok.eos,
                   max_context=ckpt.weights.preset.seq_length, vocab_limit=tok.vocab_size)
    return tok.decode(ids)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from megatron_sl.model.hf import ExportError
    from megatron_sl.training.data import DataError
    from megatron_sl.training.export import read_checkpoint

    try:
        check_args(args)
        import torch

        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        if device == "cuda" and not torch.cuda.is_available():
            raise ExportError("--device cuda: no CUDA device is available")
        ckpt = read_checkpoint(args.checkpoint)
        text = sample_text(ckpt, args.prompt, args.max_new_tokens, top_p=args.top_p, temperature=args.temperature,
                           seed=args.seed, device=device, tokenizer=args.tokenizer)
    except (ExportError, DataError) as e:
        print(f"megatron-sl generate: error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
