"""`nanoforge sample`: continue a prompt with a checkpoint (greedy by default, streamed to stdout).
`nanoforge serve`: the web UI and the OpenAI-compatible API (nanoforge/infer/server.py)."""

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
    register_serve(sub)


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


def register_serve(sub: argparse._SubParsersAction) -> None:
    p = subparser(sub, "serve", "serve checkpoints to a browser (web UI at /) and to OpenAI clients (/v1)",
                  "nanoforge serve checkpoints/sft/demo --port 8000")
    p.add_argument("checkpoints", nargs="*", metavar="CKPT",
                   help="checkpoint folders, tag names or export folders (default: every checkpoint and export "
                        "under $NANOFORGE_HOME)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (other than loopback needs --api-key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the API")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without --api-key")
    p.add_argument("--max-loaded", type=int, default=2, help="models kept loaded at once")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together per model")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting per model before 429")
    p.add_argument("--max-tokens", type=int, default=4096, help="largest max_tokens a request may ask for")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is often fastest for small models on a busy CPU)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from nanoforge.infer.server import ServeLimits, serve

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    def ready(models: list) -> None:
        print(f"serving {len(models)} model(s): {', '.join(m.id for m in models)}", file=sys.stderr)
        print(f"web UI: http://{args.host}:{args.port}/   OpenAI API: http://{args.host}:{args.port}/v1",
              file=sys.stderr)

    serve(args.checkpoints, host=args.host, port=args.port, api_key=args.api_key, insecure=args.insecure,
          max_loaded=args.max_loaded, device=args.device, max_batch=args.max_batch, max_queue=args.max_queue,
          limits=ServeLimits(max_tokens=args.max_tokens), on_ready=ready)
    return 0
