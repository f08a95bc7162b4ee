"""`nanoforge sample`: continue a prompt with a checkpoint (greedy by default, streamed to stdout)."""

from __future__ import annotations

import argparse
import json
import sys

from nanoforge.cli import subparser


def register(sub: argparse._SubParsersAction) -> None:
    p = subparser(sub, "sample", "continue a prompt with a checkpoint (greedy unless --temperature > 0)",
                  'nanoforge sample checkpoints/base/demo --prompt "Es war einmal" --max-new-tokens 64')
    p.add_argument("checkpoint", help="a tag folder (latest step), a model_<step>.safetensors file or a tag name")
    p.add_argument("--prompt", required=True, help="text to continue (encoded with BOS)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--tokenizer", default=None, help="override the tokenizer named in the checkpoint meta")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print {prompt, completion} as JSON")
    p.set_defaults(func=_sample)


def _sample(args: argparse.Namespace) -> int:
    from nanoforge.infer.engine import load_checkpoint, stream

    model, tok, _ = load_checkpoint(args.checkpoint, device=args.device, tokenizer=args.tokenizer)
    pieces = stream(model, tok, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, seed=args.seed, stop=args.stop)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "completion": "".join(pieces)}, ensure_ascii=False))
        return 0
    sys.stdout.write(args.prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
