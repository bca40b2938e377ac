#!/usr/bin/env python
"""Sample text from an NSA model: model config + checkpoint + tokenizer -> text.

  python tools/generate.py --config configs/model/tiny.yaml --checkpoint model.pt \
      --tokenizer data/tokenizer --prompt "Once upon a time" --max-new-tokens 64

The checkpoint is a plain state_dict saved with torch.save (loaded with weights_only=True),
a .safetensors file, a directory of .safetensors shards, or a folder written by
``nsa-convert consolidate`` (its ``optimizer.safetensors``, if any, is not weights; its
``config.json`` is the model config when ``--config`` is not given). ``--random-weights`` skips it
(smoke runs); without a tokenizer, ``--prompt-ids 1,5,7`` gives the prompt as token ids and
the output is printed as ids. Several --prompt flags make one batch (right-padded).
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def load_state_dict(path: str):
    """A flat {name: tensor} from a .pt/.pth state_dict, a .safetensors file or a shard folder."""
    import torch

    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        from nsa_dist.convert.io import load_weights_dir
        return load_weights_dir(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors differ by torch version
        raise ValueError(f"cannot load {path} as a weights-only state_dict ({err}); save the model "
                         "with torch.save(model.state_dict(), path) or as safetensors") from err
    for key in ("model", "module", "state_dict"):  # common wrappers around the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state_dict")
    return state


def load_weights(model, path: str) -> None:
    """Load a checkpoint into model strictly; missing/unexpected names are a ValueError."""
    state = load_state_dict(path)
    state = {k[len("_orig_mod."):] if k.startswith("_orig_mod.") else k: v for k, v in state.items()}
    if model.config.tie_embeddings and "lm_head.weight" not in state and "embed.weight" in state:
        state["lm_head.weight"] = state["embed.weight"]  # tied: safetensors stores it once
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit the model config: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"checkpoint {path} does not fit the model config: {err}") from err


def _load_tokenizer(path: str):
    from nsa_dist.data import Tokenizer
    return Tokenizer.load(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="model config YAML (ModelConfig); default: the config.json of a "
                                    "consolidated --checkpoint folder")
    p.add_argument("--checkpoint", help="state_dict .pt, .safetensors file or folder")
    p.add_argument("--random-weights", action="store_true", help="no checkpoint: random init (smoke test)")
    p.add_argument("--tokenizer", help="tokenizer directory (tokenizer.model inside)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", default=[], help="comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--stop-token", type=int, default=None, help="default: the tokenizer's EOS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--stats", action="store_true", help="print the mean tokens read per decode step")
    p.add_argument("--backend", choices=("auto", "reference", "triton"), default="auto",
                   help="decode path: auto = the Triton decode kernels on CUDA, PyTorch elsewhere")
    p.add_argument("--no-cuda-graphs", action="store_true", help="launch each decode step eagerly on CUDA")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _generate(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"generate: error: {err}", file=sys.stderr)
        return 2


def _model_config(args):
    """--config, else the consolidated checkpoint folder's own config."""
    from nsa_dist import ModelConfig

    if args.config:
        return ModelConfig.from_yaml(args.config)
    if args.checkpoint and os.path.isdir(args.checkpoint):
        from nsa_dist.convert.io import load_consolidated_config
        return load_consolidated_config(args.checkpoint)
    raise SystemExit("give --config MODEL.yaml (or a consolidated --checkpoint folder, which holds its config)")


def _generate(args) -> int:
    import torch

    from nsa_dist.inference import generate
    from nsa_dist.models import NSADecoderLM

    if not args.random_weights and not args.checkpoint:
        raise SystemExit("give --checkpoint PATH, or --random-weights for a smoke run")
    cfg = _model_config(args)
    tok = _load_tokenizer(args.tokenizer) if args.tokenizer else None
    prompts = [[int(t) for t in s.split(",") if t.strip()] for s in args.prompt_ids]
    if args.prompt:
        if tok is None:
            raise SystemExit("--prompt needs --tokenizer (or use --prompt-ids)")
        prompts += [[tok.bos_id] + tok.encode(text) for text in args.prompt]
    if not prompts:
        raise SystemExit("give at least one --prompt or --prompt-ids")
    bad = [t for p in prompts for t in p if not 0 <= t < cfg.vocab_size]
    if bad:
        raise SystemExit(f"token ids {bad[:5]} are outside the vocabulary [0, {cfg.vocab_size})")
    torch.manual_seed(args.seed)
    model = NSADecoderLM(cfg)
    if args.checkpoint:
        load_weights(model, args.checkpoint)
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    stop = args.stop_token if args.stop_token is not None else (tok.eos_id if tok else None)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    start = time.perf_counter()
    out = generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, stop_token=stop, pad_id=tok.pad_id if tok else 0, generator=gen,
                   backend=args.backend, cuda_graphs=False if args.no_cuda_graphs else None, count_reads=args.stats)
    seconds = time.perf_counter() - start
    for prompt, new in zip(prompts, out.tokens):
        if tok is not None:
            print(tok.decode(prompt) + tok.decode(new))
        else:
            print(",".join(map(str, prompt)) + " | " + ",".join(map(str, new)))
    if args.stats:
        n = sum(len(t) for t in out.tokens)
        print(f"# {n} tokens in {seconds:.2f}s", file=sys.stderr)
        if out.step_stats:
            print(f"# last step, mean reads per layer/head: {out.step_stats[-1].per_branch()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
