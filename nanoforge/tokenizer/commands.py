"""`nanoforge tokenizer train|eval|export-hf|import-hf|import-nanochat|import-tiktoken`: thin wrappers over
the library."""

from __future__ import annotations

import argparse
import json
import sys

from nanoforge.cli import subparser


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("tokenizer", help="train, evaluate, export and import tokenizers",
                           description="Train, evaluate, export and import tokenizers.")
    tsub = group.add_subparsers(dest="tokenizer_command", metavar="<command>")

    p = subparser(tsub, "train", "train a byte-level BPE tokenizer on parquet/jsonl/txt documents",
                  "nanoforge tokenizer train --data ~/corpus/de --vocab-size 32768 --backend rustbpe --name de32k")
    p.add_argument("--data", required=True, nargs="+", help="corpus folder(s) or file(s)")
    p.add_argument("--vocab-size", type=int, default=65_536, help="vocabulary size, special tokens included")
    p.add_argument("--backend", default="rustbpe", help="rustbpe | neox | python")
    p.add_argument("--name", help="save as $NANOFORGE_HOME/tokenizers/NAME")
    p.add_argument("--out", help="save to this folder instead")
    p.add_argument("--max-chars", type=int, default=None, help="stop after this many characters (nanochat: 10B)")
    p.add_argument("--doc-cap", type=int, default=None, help="cut each document to this many characters")
    p.add_argument("--neox-compat", action="store_true",
                   help="neox backend: GPT-NeoX's exact recipe (NFKC, prefix space, lossy on unseen bytes)")
    p.add_argument("--force", action="store_true", help="replace an existing tokenizer")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_train)

    p = subparser(tsub, "eval", "compare tokenizers with GerTokEval's metrics (tables, JSON, plots)",
                  "nanoforge tokenizer eval --config tokenizers.json --data ~/corpus/de --samples 1000 --out eval/\n"
                  "  nanoforge tokenizer eval --config tokenizers.json --datasets dataset-configs.json --out eval/")
    p.add_argument("--config", required=True,
                   help='JSON: {"name": {"class": "huggingface"|"nanoforge", "path": ...}, ...}')
    p.add_argument("--data", nargs="+", help="evaluation text: corpus folder(s) or file(s)")
    p.add_argument("--datasets", help="GerTokEval dataset-configs.json: several datasets, per-dataset tables, "
                   "plots and the fairness Gini across them (instead of --data)")
    p.add_argument("--samples", type=int, default=None,
                   help="use the first N non-empty texts (per dataset with --datasets; default: all)")
    p.add_argument("--unit", default="bytes", choices=["bytes", "words"], help="fertility denominator")
    p.add_argument("--cost-unit", default="texts", choices=["texts", "bytes", "words"],
                   help="unit of the Gini's cost and the compression ratio (GerTokEval's default: texts)")
    p.add_argument("--gertokeval-bold", action="store_true",
                   help="bold the highest tokens/line as GerTokEval's tables do (ours: lowest is best)")
    p.add_argument("--out", required=True, help="folder for results.md/.tex/.csv/.json and plots")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_eval)

    p = subparser(tsub, "export-hf", "write Hugging Face fast-tokenizer files (AutoTokenizer loads them)",
                  "nanoforge tokenizer export-hf de32k --out ~/hf/de32k")
    p.add_argument("tokenizer", help="tokenizer name or folder")
    p.add_argument("--out", required=True, help="output folder (other files in it are left alone)")
    p.add_argument("--force", action="store_true", help="overwrite tokenizer files already in --out")
    p.set_defaults(func=_export_hf)

    p = subparser(tsub, "import-hf", "import a Hugging Face tokenizer (folder or tokenizer.json) for comparisons",
                  "nanoforge tokenizer import-hf ~/hf/gpt2 --name gpt2")
    p.add_argument("src", help="Hugging Face tokenizer folder or tokenizer.json")
    p.add_argument("--name", required=True)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_import_hf)

    p = subparser(tsub, "import-nanochat", "import a nanochat tokenizer folder (tokenizer.pkl)",
                  "nanoforge tokenizer import-nanochat ~/.cache/nanochat/tokenizer --name nanochat")
    p.add_argument("src", help="nanochat tokenizer folder (holds tokenizer.pkl) or the .pkl file; read by a "
                               "restricted unpickler that runs no code")
    p.add_argument("--name", required=True)
    p.add_argument("--trust-pickle", action="store_true", help=argparse.SUPPRESS)  # no longer needed
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_import_nanochat)

    p = subparser(tsub, "import-tiktoken", "import a tiktoken rank file (Qwen2.5's qwen.tiktoken, cl100k_base, ...)",
                  "nanoforge tokenizer import-tiktoken qwen.tiktoken --pattern qwen2 "
                  "--specials '<|endoftext|>,<|im_start|>,<|im_end|>' --name qwen2.5")
    p.add_argument("src", help='a *.tiktoken file: one "base64(token) rank" per line')
    p.add_argument("--name", required=True)
    p.add_argument("--pattern", required=True,
                   help="the split regex, or a known name: nanochat, cl100k, qwen2")
    p.add_argument("--specials", default="",
                   help="comma-separated special tokens of the file, TOKEN (next free id) or TOKEN=ID; our nine "
                        "chat specials that are missing are appended after them")
    p.add_argument("--no-chat-specials", action="store_true", help="do not append the chat special tokens")
    p.add_argument("--force", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_import_tiktoken)

    group.set_defaults(func=lambda args: group.print_help() or 2)


def _print(obj: dict, as_json: bool, text: str) -> None:
    print(json.dumps(obj, indent=2) if as_json else text.rstrip("\n"), file=sys.stdout)


def _train(args: argparse.Namespace) -> int:
    from nanoforge.tokenizer import Tokenizer
    from nanoforge.tokenizer.train import train_tokenizer

    path = train_tokenizer(args.data, vocab_size=args.vocab_size, backend=args.backend, name=args.name,
                           out=args.out, max_chars=args.max_chars, doc_cap=args.doc_cap, force=args.force,
                           neox_compat=args.neox_compat)
    tok = Tokenizer.load(path)
    _print({"path": str(path), "vocab_size": tok.vocab_size, "fingerprint": tok.fingerprint,
            "seconds": tok.meta["training"]["seconds"]}, args.json, str(path))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from nanoforge.tokenizer.metrics import evaluate_tokenizers

    result = evaluate_tokenizers(args.config, args.data, samples=args.samples, unit=args.unit,
                                 cost_unit=args.cost_unit, datasets=args.datasets,
                                 gertokeval_bold=args.gertokeval_bold, out=args.out)
    _print(result["summary"], args.json, result["tables"]["md"])
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from nanoforge.tokenizer import Tokenizer
    from nanoforge.tokenizer.hf import export_hf

    tok = Tokenizer.load(args.tokenizer)
    print(export_hf(tok, args.out, force=args.force))
    return 0


def _import_hf(args: argparse.Namespace) -> int:
    from nanoforge.tokenizer.hf import import_hf

    print(import_hf(args.src, name=args.name, force=args.force))
    return 0


def _import_nanochat(args: argparse.Namespace) -> int:
    from nanoforge.tokenizer.formats import import_nanochat

    print(import_nanochat(args.src, name=args.name, force=args.force))
    return 0


def _import_tiktoken(args: argparse.Namespace) -> int:
    from nanoforge.tokenizer import Tokenizer
    from nanoforge.tokenizer.formats import import_tiktoken

    path = import_tiktoken(args.src, name=args.name, pattern=args.pattern, specials=args.specials.split(","),
                           add_chat_specials=not args.no_chat_specials, force=args.force)
    tok = Tokenizer.load(path)
    _print({"path": str(path), "vocab_size": tok.vocab_size, "special_tokens": tok.special_tokens,
            "fingerprint": tok.fingerprint}, args.json,
           f"{path} ({tok.vocab_size} ids, {len(tok.special_tokens)} special tokens)")
    return 0
