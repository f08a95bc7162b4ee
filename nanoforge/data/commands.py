"""CLI for the data stage: `nanoforge data download|import|tokenize|inspect` and `nanoforge plan`."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from nanoforge.cli import subparser
from nanoforge.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("data", help="download, import and tokenize corpora",
                           description="Download, import and tokenize corpora.")
    data = group.add_subparsers(dest="data_command", metavar="<command>", required=True)

    p = subparser(data, "download", "download parquet shards of a Hugging Face dataset (resumable, verified)",
                  "nanoforge data download karpathy/fineweb-edu-100b-shuffle --shards 0-7 --workers 4")
    p.add_argument("repo", help="dataset repository, e.g. karpathy/fineweb-edu-100b-shuffle")
    p.add_argument("--shards", default="0", help="shard indices: 0-7, 0,3,5 or 3")
    p.add_argument("--pattern", default="shard_{:05d}.parquet", help="file name of shard i in the repository")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.add_argument("--out", default=None, help="folder (default: $NANOFORGE_HOME/corpora/<repo name>)")
    p.add_argument("--workers", type=int, default=4, help="parallel downloads")
    p.add_argument("--retries", type=int, default=5, help="attempts per shard before giving up")
    p.add_argument("--column", default="text", help="column every shard must have")
    p.add_argument("--json", action="store_true", help="print the downloaded files as JSON")
    p.set_defaults(func=_download)

    p = subparser(data, "import", "turn your own .txt/.jsonl/.json/.parquet files into standard parquet shards",
                  "nanoforge data import ~/texts/*.txt --split-blank-lines --out ~/corpus/mine --dedup")
    p.add_argument("paths", nargs="+", help="files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output folder (a path, or a name under $NANOFORGE_HOME/corpora)")
    p.add_argument("--column", default="text", help="JSON field / parquet column holding the text")
    p.add_argument("--split-blank-lines", action="store_true", help=".txt: one document per blank-line block")
    p.add_argument("--shard-chars", default="250M", help="characters per output shard (250M, 1e6, 5000)")
    p.add_argument("--dedup", action="store_true", help="drop exact duplicate documents")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_import)

    p = subparser(data, "tokenize", "tokenize a corpus into token shards for training (parallel, resumable)",
                  "nanoforge data tokenize --corpus ~/corpus/de --tokenizer de32k --name de32k --val-docs 200")
    p.add_argument("--corpus", required=True, nargs="+", help="corpus folders/files, or a corpus name")
    p.add_argument("--tokenizer", required=True, help="tokenizer name or folder")
    p.add_argument("--name", default=None, help="output name under $NANOFORGE_HOME/tokens "
                                                "(default: <corpus>-<tokenizer>)")
    p.add_argument("--out", default=None, help="output folder (overrides --name's location)")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-docs", type=int, default=None, help="the first N documents are validation")
    val.add_argument("--val-fraction", type=float, default=None,
                     help="an evenly spread fraction of documents is validation (default 0.01)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--shard-tokens", default="100M", help="tokens per shard")
    p.add_argument("--column", default="text", help="parquet column / JSON field")
    p.add_argument("--force", action="store_true", help="start over, replacing the output folder")
    p.add_argument("--json", action="store_true", help="print meta.json")
    p.set_defaults(func=_tokenize)

    p = subparser(data, "inspect", "check token shards (headers, sizes) and print their metadata",
                  "nanoforge data inspect de32k")
    p.add_argument("tokens", help="token folder name or path")
    p.add_argument("--json", action="store_true", help="print meta.json")
    p.set_defaults(func=_inspect)

    p = subparser(sub, "plan", "how many tokens, characters, shards and FLOPs a model needs (Chinchilla-style)",
                  "nanoforge plan --params 156M --params 561M --params 1.5B")
    p.add_argument("--params", action="append", default=[], help="parameter count: 561M, 1.5B, 125000000 "
                                                                  "(repeatable)")
    p.add_argument("--preset", action="append", default=[], help="model preset, e.g. d12 (repeatable)")
    p.add_argument("--ratio", type=float, default=20.0, help="training tokens per parameter")
    p.add_argument("--chars-per-token", type=float, default=None, help="default 4.8, or measured with "
                                                                       "--tokenizer and --corpus")
    p.add_argument("--chars-per-shard", default=None, help="default 250M, or measured on --corpus")
    p.add_argument("--tokenizer", default=None, help="measure characters per token with this tokenizer ...")
    p.add_argument("--corpus", default=None, help="... on this corpus (folder or name)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_plan)


def parse_count(text: str | int | float, what: str = "number") -> int:
    """`561M`, `1.5B`, `250k`, `2e9` or `125000000` as an int; one-line UserError otherwise."""
    s = str(text).strip().replace("_", "").replace(",", "")
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(s[-1:].upper(), 1)
    try:
        value = float(s[:-1] if scale != 1 else s) * scale
    except ValueError:
        raise UserError(f"{what} {text!r} is not a number (examples: 561M, 1.5B, 125000000)") from None
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{what} must be a positive finite number, got {text!r}")
    return int(round(value))


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def _download(args: argparse.Namespace) -> int:
    from nanoforge.data.download import download_shards, parse_shards

    paths = download_shards(args.repo, parse_shards(args.shards), args.out, revision=args.revision,
                            workers=args.workers, pattern=args.pattern, retries=args.retries, column=args.column)
    if args.json:
        _print_json([str(p) for p in paths])
    else:
        print(f"{len(paths)} shard(s) in {paths[0].parent if paths else args.out}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from nanoforge.data.importer import import_documents

    out = import_documents(args.paths, args.out, column=args.column, split_blank_lines=args.split_blank_lines,
                           shard_chars=parse_count(args.shard_chars, "--shard-chars"), dedup=args.dedup,
                           force=args.force)
    from nanoforge import home
    summary = home.read_json(out / ".import.json", "import summary")
    if args.json:
        _print_json(summary)
    else:
        print(f"{summary['documents']:,} documents, {summary['chars']:,} characters in "
              f"{summary['shards']} shard(s) at {out} (dropped {summary['dropped_empty']:,} empty, "
              f"{summary['dropped_duplicates']:,} duplicate)")
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    from nanoforge.data.shards import read_meta
    from nanoforge.data.tokenize import tokenize_corpus

    out = tokenize_corpus(args.corpus if len(args.corpus) > 1 else args.corpus[0], args.tokenizer,
                          name=args.name, out=args.out, val_docs=args.val_docs, val_fraction=args.val_fraction,
                          workers=args.workers, force=args.force,
                          shard_tokens=parse_count(args.shard_tokens, "--shard-tokens"), column=args.column)
    meta = read_meta(out)
    if args.json:
        _print_json(meta)
    else:
        print(_meta_summary(meta))
    return 0


def _meta_summary(meta: dict) -> str:
    s = meta["splits"]
    return (f"{meta['path']}: {s['train']['tokens']:,} train tokens in {s['train']['shards']} shard(s), "
            f"{s['val']['tokens']:,} val tokens in {s['val']['shards']} shard(s); {meta['documents']:,} documents, "
            f"{meta['chars_per_token']:.3f} chars/token, {meta['dtype']}")


def _inspect(args: argparse.Namespace) -> int:
    from nanoforge.data import shards

    meta = shards.read_meta(args.tokens)
    for split in shards.SPLITS:
        paths = shards.shard_paths(meta["path"], split)
        total = sum(shards.read_header(p)["count"] for p in paths)
        if total != meta["splits"][split]["tokens"]:
            raise UserError(f"token folder {meta['path']}: {split} shards hold {total:,} tokens, meta.json says "
                            f"{meta['splits'][split]['tokens']:,}")
        docs = len(shards.document_starts(meta["path"], split, int(meta.get("bos_id", -1))))
        if "documents" in meta["splits"][split] and docs != meta["splits"][split]["documents"]:
            raise UserError(f"token folder {meta['path']}: the {split} document table lists {docs:,} documents, "
                            f"meta.json says {meta['splits'][split]['documents']:,}")
    if args.json:
        _print_json(meta)
    else:
        print(_meta_summary(meta))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from nanoforge.plan import format_plan, make_plan, measure

    if not args.params and not args.preset:
        raise UserError("give --params N (e.g. 561M) or --preset NAME")
    if args.tokenizer and not args.corpus:
        raise UserError("measuring characters per token needs both --tokenizer and --corpus")
    cpt, cps = args.chars_per_token, args.chars_per_shard
    cps = parse_count(cps, "--chars-per-shard") if cps is not None else None
    measured: dict[str, Any] = {}
    if args.corpus:
        measured = measure(args.corpus, args.tokenizer)
        cpt = cpt if cpt is not None else measured.get("chars_per_token")
        cps = cps if cps is not None else measured.get("chars_per_shard")
    models = [(p, parse_count(p, "--params")) for p in args.params]
    for name in args.preset:
        from nanoforge.config import preset_model

        models.append((name, preset_model(name).num_params()))
    plan = make_plan(models, ratio=args.ratio, chars_per_token=cpt, chars_per_shard=cps)
    plan["measured"] = measured
    if args.json:
        _print_json(plan)
    else:
        sys.stdout.write(format_plan(plan))
    return 0
