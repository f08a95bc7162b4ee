"""`nanoforge pull` and `nanoforge push`: thin wrappers over nanoforge/hub.py."""

from __future__ import annotations

import argparse
import json

from nanoforge.cli import subparser


def register(sub: argparse._SubParsersAction) -> None:
    p = subparser(sub, "pull", "download a model export, tokenizer, dataset or nanochat bundle from the Hub",
                  "nanoforge pull karpathy/nanochat-d32 --kind nanochat --phase sft")
    p.add_argument("repo", help="Hub repository, e.g. someone/de-125m")
    p.add_argument("--kind", default="model", choices=["model", "tokenizer", "dataset", "nanochat"],
                   help="model -> exports/NAME, tokenizer -> tokenizers/NAME, dataset -> corpora/NAME, "
                        "nanochat -> nanochat/NAME imported as checkpoints/PHASE/NAME")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.add_argument("--name", default=None, help="local name (default: the repository's name)")
    p.add_argument("--phase", default="base", choices=["base", "mid", "sft", "rl"], help="for --kind nanochat")
    p.add_argument("--force", action="store_true", help="replace an existing local copy")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_pull)

    q = subparser(sub, "push", "upload a tokenizer, model export (with a model card) or parquet shards to the Hub",
                  "nanoforge push exports/de-125m someone/de-125m --private")
    q.add_argument("path", help="a tokenizer folder, an export folder, a corpus folder, or one of their names")
    q.add_argument("repo", help="Hub repository to create or update")
    q.add_argument("--private", action="store_true", help="create the repository as private")
    q.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    q.add_argument("--message", default=None, help="commit message")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_push)


def _pull(args: argparse.Namespace) -> int:
    from nanoforge.hub import pull

    out = pull(args.repo, kind=args.kind, revision=args.revision, name=args.name, force=args.force,
               phase=args.phase)
    print(json.dumps({"repo": args.repo, "kind": args.kind, "path": str(out)}) if args.json
          else f"pulled {args.repo} ({args.kind}) to {out}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from nanoforge.hub import push

    info = push(args.path, args.repo, private=args.private, revision=args.revision, message=args.message)
    print(json.dumps(info) if args.json else f"pushed {info['kind']} {args.path} to {info['repo']} "
          f"({len(info['files'])} files, commit {info['commit']})")
    return 0
