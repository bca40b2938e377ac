#!/usr/bin/env python
"""Train the SentencePiece tokenizer (cached, deterministic); see --help."""
import argparse
import sys

from nsa_dist.data.tokenizer import train_tokenizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--input", nargs="*", default=None, metavar="PATH",
                   help="directories, files (.jsonl: one document per record's 'text'), @LIST "
                        "(a file naming paths, one a line) or 'stdlib' (default: the Python "
                        "standard library's .py sources)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--output", required=True, metavar="DIR",
                   help="writes DIR/tokenizer.model and DIR/tokenizer.json")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--max-sentences", type=int, default=200_000,
                   help="lines sampled (seeded) for training; caps the time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="retrain even when cached")
    args = p.parse_args(argv)
    try:
        meta = train_tokenizer(args.input, args.vocab_size, args.output, model_type=args.model_type,
                               max_sentences=args.max_sentences, seed=args.seed, force=args.force)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"tokenizer {'reused' if meta['reused'] else 'trained'}: {args.output} "
          f"(vocab {meta['vocab_size']}, bos {meta['bos_id']}, eos {meta['eos_id']}, "
          f"pad {meta['pad_id']}, sha256 {meta['sha256'][:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
