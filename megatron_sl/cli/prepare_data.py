"""``megatron-sl prepare-data``: JSONL -> sentencepiece -> megatron indexed ``.bin/.idx``.

Owns the command line only; the work is :mod:`megatron_sl.training.data.preprocess`.

    megatron-sl prepare-data --input a.jsonl [b.jsonl.gz ...] --json-key text \\
        --output-prefix out/name [--tokenizer-model tok.model | --vocab-size 8000] \\
        [--append-eod] --workers N [--max-docs N]
    megatron-sl prepare-data --demo [--data-dir data]   # fetch the demo corpus and prepare it
    megatron-sl prepare-data --fingerprint PREFIX --tokenizer-model tok.model   # data made elsewhere:
        record its tokenizer (writes PREFIX.meta.json, which training checks the tokenizer against)

Exit codes: 0 done; 2 bad arguments or data (one message naming the bad value; nothing written).
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_sl.constants import DEFAULT_DATA_DIR
from megatron_sl.training.data.errors import DataError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-sl prepare-data",
        description="Tokenize JSONL documents with sentencepiece into megatron indexed .bin/.idx files "
                    "(<output-prefix>_text_document.{bin,idx}, plus <output-prefix>_tokenizer.model when "
                    "the tokenizer is trained here).")
    parser.add_argument("--input", nargs="+", metavar="FILE",
                        help="JSONL inputs (.jsonl/.json, optionally .gz); globs are expanded")
    parser.add_argument("--json-key", default="text", help="field holding each document's text (default: text)")
    parser.add_argument("--output-prefix", metavar="PREFIX", help="output path stem, e.g. data/corpus")
    tok = parser.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer-model", metavar="MODEL", help="an existing sentencepiece .model to use")
    tok.add_argument("--vocab-size", type=int, default=None,
                     help="train a byte-fallback BPE of this size on the inputs (default: 8000)")
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                        help="append the end-of-document id to every document (default: on)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer threads (default: 1)")
    parser.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    parser.add_argument("--demo", action="store_true",
                        help="fetch the demo corpus (Jane Austen from Debian, or a fallback) and prepare it")
    parser.add_argument("--fingerprint", metavar="PREFIX",
                        help="write the meta file of existing indexed data PREFIX (prepared without this tool), "
                             "recording --tokenizer-model as its tokenizer")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                        help=f"with --demo: where raw/ and demo/ go (default: {DEFAULT_DATA_DIR})")
    return parser


def _configure_logging() -> None:
    logger = logging.getLogger("megatron_sl")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("prepare-data: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging()
    from megatron_sl.training.data import preprocess

    try:
        if args.fingerprint:
            if not args.tokenizer_model:
                raise DataError("--fingerprint needs --tokenizer-model (the tokenizer the data was made with)")
            print(f"meta file: {preprocess.fingerprint_existing(args.fingerprint, args.tokenizer_model)}")
            return 0
        if args.demo:
            extra = [flag for flag, value in (("--input", args.input), ("--output-prefix", args.output_prefix),
                                              ("--tokenizer-model", args.tokenizer_model),
                                              ("--max-docs", args.max_docs)) if value is not None]
            if extra:
                raise DataError(f"--demo prepares the demo corpus; it takes no {', '.join(extra)}")
            from megatron_sl.corpus import prepare_demo_data

            result = prepare_demo_data(args.data_dir, vocab_size=args.vocab_size or 8000, workers=args.workers)
        else:
            missing = [flag for flag, value in (("--input", args.input), ("--output-prefix", args.output_prefix))
                       if not value]
            if missing:
                raise DataError(f"{' and '.join(missing)} required (or use --demo)")
            result = preprocess.prepare_indexed_dataset(
                args.input, args.output_prefix, json_key=args.json_key, tokenizer_model=args.tokenizer_model,
                vocab_size=args.vocab_size or 8000, append_eod=args.append_eod, workers=args.workers,
                max_docs=args.max_docs)
    except DataError as err:
        print(f"megatron-sl prepare-data: error: {err}", file=sys.stderr)
        return 2
    print(f"data prefix: {result.prefix}")
    print(f"tokenizer:   {result.tokenizer_model}")
    print(f"summary:     {result.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
