#!/usr/bin/env python
"""Tokenize a corpus into train/valid token shards (cached); see --help."""
import argparse
import sys

from nsa_dist.data.shards import preprocess_corpus


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--input", nargs="*", default=None, metavar="PATH",
                   help="directories, files (.jsonl: one document per record's 'text'), @LIST "
                        "(a file naming paths, one a line) or 'stdlib' (default: the Python "
                        "standard library's .py sources)")
    p.add_argument("--tokenizer", required=True, metavar="DIR",
                   help="tokenizer directory (or .model file) from tools/train_tokenizer.py")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="writes PREFIX_train.{bin,idx}, PREFIX_valid.{bin,idx}, PREFIX_meta.json")
    p.add_argument("--valid-fraction", type=float, default=0.01)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234, help="seed of the train/valid split")
    p.add_argument("--force", action="store_true", help="rebuild even when cached")
    args = p.parse_args(argv)
    try:
        meta = preprocess_corpus(args.input, args.tokenizer, args.output_prefix,
                                 valid_fraction=args.valid_fraction, workers=args.workers,
                                 seed=args.seed, force=args.force)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{s} {c['num_docs']} docs / {c['num_tokens']} tokens"
                       for s, c in meta["splits"].items())
    print(f"shards {'reused' if meta['reused'] else 'written'}: {args.output_prefix}_* ({counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
