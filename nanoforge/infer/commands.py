"""`nanoforge sample` (continue a prompt), `nanoforge chat` (talk to a chat checkpoint; `chat render`
shows how a conversation file is tokenized) and `nanoforge serve` (the web UI and the OpenAI-compatible API,
nanoforge/infer/server.py)."""

from __future__ import annotations

import argparse
import json
import sys

from nanoforge.cli import subparser


def _sampling_flags(p: argparse.ArgumentParser, *, temperature: float, top_k: int | None, max_new: int) -> None:
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=top_k, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=max_new)
    p.add_argument("--tokenizer", default=None, help="override the tokenizer named in the checkpoint meta")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is often fastest for small models on a busy CPU)")


def register(sub: argparse._SubParsersAction) -> None:
    p = subparser(sub, "sample", "continue a prompt with a checkpoint (greedy unless --temperature > 0)",
                  'nanoforge sample checkpoints/base/demo --prompt "Es war einmal" --max-new-tokens 64')
    p.add_argument("checkpoint", help="a tag folder (latest step), a model_<step>.safetensors file or a tag name")
    p.add_argument("--prompt", required=True, help="text to continue (encoded with BOS)")
    _sampling_flags(p, temperature=0.0, top_k=None, max_new=64)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print {prompt, completion} as JSON")
    p.set_defaults(func=_sample)
    register_serve(sub)

    p = subparser(sub, "chat", "chat with a checkpoint in the terminal (or: chat render FILE shows a conversation's tokens)",
                  'nanoforge chat sft/d20 -p "Was ist 12*7?" --json\n  nanoforge chat render data.jsonl --line 3 --tokenizer de32k')
    p.add_argument("checkpoint", help="a chat checkpoint (tag folder, model file or tag name), or `render`")
    p.add_argument("file", nargs="?", help="(render) a file of conversations")
    p.add_argument("-p", "--prompt", default=None, help="answer this one message and exit")
    p.add_argument("--system", default=None, help="system prompt")
    _sampling_flags(p, temperature=0.6, top_k=50, max_new=512)
    p.add_argument("--json", action="store_true", help='with -p: print {"reply", "usage", "timings"} as JSON')
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at <|assistant_end|> (for benchmarks)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (worth it on CUDA)")
    p.add_argument("--no-color", action="store_true")
    p.add_argument("--line", type=int, default=None, help="(render) only the conversation on this line (1-based)")
    p.set_defaults(func=_chat)


def _params(args: argparse.Namespace, stop=None, stop_token_ids=None):
    """The sampling parameters of the flags (checked before anything loads); applies --threads."""
    from nanoforge.infer.engine import SamplingParams

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          max_tokens=args.max_new_tokens, stop=tuple(stop or ()), stop_token_ids=stop_token_ids)


def _sample(args: argparse.Namespace) -> int:
    from nanoforge.infer.engine import Engine, load_checkpoint, pick_device
    from nanoforge.infer.tools import ToolRegistry

    params = _params(args, stop=args.stop)  # bad flags fail before the model loads
    model, tok, _ = load_checkpoint(args.checkpoint, device=pick_device(args.device), tokenizer=args.tokenizer)
    ids = tok.encode(args.prompt, bos=tok.bos_id is not None)
    engine = Engine(model, tok, max_batch=1, tools=ToolRegistry())
    pieces = (d.text for d in engine.stream(ids, params))
    if args.json:
        print(json.dumps({"prompt": args.prompt, "completion": "".join(pieces)}, ensure_ascii=False))
        return 0
    sys.stdout.write(args.prompt)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _chat(args: argparse.Namespace) -> int:
    from nanoforge.errors import UserError

    if args.checkpoint == "render":
        return _render(args)
    if args.file:
        raise UserError(f"unexpected argument {args.file!r} (only `chat render` takes a file)")
    if args.json and args.prompt is None:
        raise UserError("--json needs -p PROMPT (one answer, printed as JSON)")
    from nanoforge.infer.chat import TerminalChat, one_shot
    from nanoforge.infer.engine import Engine, load_checkpoint, pick_device
    from nanoforge.tokenizer.chat import _check_specials

    params = _params(args, stop_token_ids=() if args.ignore_eos else None)
    model, tok, meta = load_checkpoint(args.checkpoint, device=pick_device(args.device), tokenizer=args.tokenizer)
    _check_specials(tok)
    if meta.get("phase", "base") == "base":
        print(f"warning: {args.checkpoint} is a base model (not trained to chat): expect continuations, "
              "not answers", file=sys.stderr)
    engine = Engine(model, tok, max_batch=1, compile=args.compile)
    if args.prompt is not None and args.json:
        print(json.dumps(one_shot(engine, params, args.prompt, system=args.system), ensure_ascii=False))
        return 0
    chat = TerminalChat(engine, params, system=args.system, color=False if args.no_color else None)
    if args.prompt is not None:
        chat.ask(args.prompt)
        return 0
    print(f"nanoforge chat · {args.checkpoint} · context {engine.context} tokens · /help for commands",
          file=sys.stderr)
    return chat.run()


def _render(args: argparse.Namespace) -> int:
    from nanoforge.data.chat import render_file
    from nanoforge.errors import UserError
    from nanoforge.tokenizer import Tokenizer

    if not args.file:
        raise UserError("chat render needs a FILE (conversations: .jsonl, .json, .parquet)")
    if not args.tokenizer:
        raise UserError("chat render needs --tokenizer NAME_OR_PATH")
    tok = Tokenizer.load(args.tokenizer)
    print(render_file(tok, args.file, line=args.line, color=sys.stdout.isatty() and not args.no_color))
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
