"""`nanoforge export hf`, `nanoforge import hf|nanochat`: to and from transformers (Llama, Qwen2, NanoChat)
and nanochat's own checkpoints."""

from __future__ import annotations

import argparse
import json

from nanoforge.cli import subparser


def register(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("export", help="export a checkpoint (Hugging Face Llama)")
    esub = ex.add_subparsers(dest="export_command", metavar="<format>")
    p = subparser(esub, "hf", "write a Hugging Face model folder (Llama, Qwen2 or NanoChat) that transformers "
                  "and lm-eval load",
                  "nanoforge export hf checkpoints/base/demo --out exports/demo --dtype bfloat16")
    p.add_argument("checkpoint", help="a tag folder (latest step), a model_<step>.safetensors file or a tag name")
    p.add_argument("--out", default=None,
                   help="the folder to write (default $NANOFORGE_HOME/exports/<tag>; refused if it exists, unless --force)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tokenizer", default=None, help="override the tokenizer named in the checkpoint meta")
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="write the Jinja chat template (default: for mid/sft/rl checkpoints)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_export)

    im = sub.add_parser("import", help="import a model (Hugging Face folder, nanochat checkpoint)")
    isub = im.add_subparsers(dest="import_command", metavar="<format>")
    q = subparser(isub, "hf", "import a transformers Llama, Qwen2 or NanoChat folder as a nanoforge checkpoint",
                  "nanoforge import hf ~/models/LLaMmlein_120M --tag llammlein")
    q.add_argument("src", help="a Hugging Face model folder (config.json, *.safetensors, tokenizer.json)")
    q.add_argument("--tag", required=True, help="checkpoint name: checkpoints/<phase>/TAG")
    q.add_argument("--phase", default="base", choices=["base", "mid", "sft", "rl"])
    q.add_argument("--tokenizer", default=None, help="use this nanoforge tokenizer instead of importing the folder's")
    q.add_argument("--force", action="store_true", help="replace an existing checkpoint/tokenizer")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_import)

    n = subparser(isub, "nanochat", "import a nanochat checkpoint (model_<step>.pt, meta_<step>.json, tokenizer.pkl)",
                  "nanoforge import nanochat ~/.cache/nanochat/base_checkpoints/d20 --tag d20")
    n.add_argument("path", help="nanochat's <base>/<phase>_checkpoints/<tag> folder (the tokenizer is found in "
                                "<base>/tokenizer), a folder holding all the files, or a model_<step>.pt")
    n.add_argument("--tag", required=True, help="checkpoint name: checkpoints/<phase>/TAG (tokenizer: tokenizers/TAG)")
    n.add_argument("--phase", default="base", choices=["base", "mid", "sft", "rl"])
    n.add_argument("--step", type=int, default=None, help="the step to import (default: the latest)")
    n.add_argument("--force", action="store_true", help="replace an existing checkpoint/tokenizer")
    n.add_argument("--json", action="store_true")
    n.set_defaults(func=_import_nanochat)


def _export(args: argparse.Namespace) -> int:
    from nanoforge.export.hf import export_hf

    out = export_hf(args.checkpoint, args.out, dtype=args.dtype, force=args.force, tokenizer=args.tokenizer,
                    chat_template=args.chat_template)
    info = json.loads((out / "nanoforge.json").read_text(encoding="utf-8"))
    if args.json:
        print(json.dumps({"export": str(out), "source": info["source"], "step": info["step"], "dtype": args.dtype}))
    else:
        arch = json.loads((out / "config.json").read_text(encoding="utf-8"))["architectures"][0]
        print(f"exported {info['source']} step {info['step']} to {out} ({arch}, {args.dtype})")
    return 0


def _import(args: argparse.Namespace) -> int:
    from nanoforge.export.hf import import_hf

    dest = import_hf(args.src, args.tag, phase=args.phase, force=args.force, tokenizer=args.tokenizer)
    tok = (json.loads(next(dest.glob("meta_*.json")).read_text(encoding="utf-8")).get("tokenizer") or {}).get("path")
    if args.json:
        print(json.dumps({"checkpoint": str(dest), "tokenizer": tok}))
    else:
        print(f"imported {args.src} to {dest} (tokenizer: {tok or 'none, pass --tokenizer when using it'})")
    return 0


def _import_nanochat(args: argparse.Namespace) -> int:
    from nanoforge.checkpoint import load_meta
    from nanoforge.export.nanochat import import_nanochat

    dest = import_nanochat(args.path, args.tag, phase=args.phase, step=args.step, force=args.force)
    _, step, meta = load_meta(dest)
    mc, tok = meta["model_config"], meta["tokenizer"]
    if args.json:
        print(json.dumps({"checkpoint": str(dest), "step": step, "tokenizer": tok["path"], "model_config": mc}))
    else:
        print(f"imported nanochat step {step} ({mc['n_layers']} layers, d_model {mc['d_model']}, vocab "
              f"{mc['vocab_size']}) to {dest}; tokenizer {tok['path']}")
    return 0
