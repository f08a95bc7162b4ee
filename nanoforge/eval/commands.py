"""`nanoforge eval bpb|tasks|compare` and `nanoforge lm-eval` (lm-eval's CLI with our model type registered)."""

from __future__ import annotations

import argparse
import json

from nanoforge.cli import subparser


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluate: bits per byte, tasks, comparison tables")
    esub = ev.add_subparsers(dest="eval_command", metavar="<command>")

    b = subparser(esub, "bpb", "validation bits per byte of a checkpoint on token shards",
                  "nanoforge eval bpb checkpoints/base/demo --tokens de4k")
    b.add_argument("checkpoint")
    b.add_argument("--tokens", required=True, help="token shards: a name under tokens/ or a folder")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--seq-len", type=int, default=None, help="default: the model's max_seq_len")
    b.add_argument("--max-batches", type=int, default=None)
    b.add_argument("--tokenizer", default=None, help="override the tokenizer named in the checkpoint meta")
    b.add_argument("--device", default="cpu")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_bpb)

    t = subparser(esub, "tasks", "multiple-choice and generative tasks (lm-eval-style YAML), scored like lm-eval",
                  "nanoforge eval tasks checkpoints/base/demo --tasks demo_mc demo_gen --out results.json")
    t.add_argument("checkpoint", nargs="?")
    t.add_argument("--tasks", nargs="+", default=[], metavar="NAME_OR_YAML")
    t.add_argument("--list", action="store_true", help="list the bundled tasks")
    t.add_argument("--limit", type=int, default=None, help="first N documents of each task")
    t.add_argument("--num-fewshot", type=int, default=None)
    t.add_argument("--tokenizer", default=None, help="override the tokenizer named in the checkpoint meta")
    t.add_argument("--device", default="cpu")
    t.add_argument("--batch-tokens", type=int, default=8192,
                   help="padded tokens per forward when scoring multiple choice (memory vs speed)")
    t.add_argument("--out", default=None, help="write the results JSON (lm-eval's layout) here")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=_tasks)

    ch = subparser(esub, "chat", "chat tasks asked in the chat format: categorical multiple choice, generation "
                   "with tools, ChatCORE", "nanoforge eval chat demo --tasks arithmetic_chat --limit 100")
    ch.add_argument("checkpoint", nargs="?")
    ch.add_argument("--tasks", nargs="+", default=[], metavar="NAME_OR_YAML")
    ch.add_argument("--list", action="store_true", help="list the bundled chat tasks")
    ch.add_argument("--limit", type=int, default=None, help="first N documents of each task")
    ch.add_argument("--tokenizer", default=None, help="override the tokenizer named in the checkpoint meta")
    ch.add_argument("--device", default="cpu")
    ch.add_argument("--batch-size", type=int, default=16, help="questions per forward / rows generated together")
    ch.add_argument("--max-new-tokens", type=int, default=None, help="override generation_kwargs.max_gen_toks")
    ch.add_argument("--out", default=None, help="write the results JSON (lm-eval's layout) here")
    ch.add_argument("--json", action="store_true")
    ch.set_defaults(func=_chat)

    c = subparser(esub, "compare", "one table of several results (ours or lm-eval's JSON): best in bold, Avg",
                  "nanoforge eval compare a.json b.json --format md --stderr")
    c.add_argument("results", nargs="+", help="results JSON files (or lm-eval --output_path folders)")
    c.add_argument("--format", default="md", choices=["md", "tex", "csv"])
    c.add_argument("--stderr", action="store_true", help="show ± standard errors")
    c.add_argument("--metrics", nargs="+", default=None, help="only these metrics, e.g. acc_norm mc2")
    c.add_argument("--names", nargs="+", default=None, help="row names, one per result")
    c.add_argument("--out", default=None, help="also write the table to this file")
    c.set_defaults(func=_compare)

    # every argument (--help included) goes to lm-eval unchanged: '+' as the prefix keeps argparse off '-' options
    lm = sub.add_parser("lm-eval", help="run lm-evaluation-harness with the `nanoforge` model type registered",
                        prefix_chars="+", add_help=False,
                        description="example:\n  nanoforge lm-eval --model nanoforge --model_args "
                                    "checkpoint=checkpoints/base/demo --tasks arc_de --include_path my_tasks/")
    lm.add_argument("lm_eval_args", nargs="*", help="arguments for lm-eval, passed unchanged")
    lm.set_defaults(func=_lm_eval)


def _bpb(args: argparse.Namespace) -> int:
    from nanoforge.eval.tasks import evaluate_bpb_checkpoint

    r = evaluate_bpb_checkpoint(args.checkpoint, args.tokens, batch_size=args.batch_size, seq_len=args.seq_len,
                                device=args.device, max_batches=args.max_batches, tokenizer=args.tokenizer)
    if r["rank"] == 0:  # under torchrun every rank has the all-reduced result; one prints it
        print(json.dumps(r, indent=2) if args.json else f"val bpb {r['val_bpb']:.4f}  ({r['tokens']:,} tokens, "
              f"{r['bytes']:,} bytes)")
    return 0


def _tasks(args: argparse.Namespace) -> int:
    from nanoforge.errors import UserError
    from nanoforge.eval.taskspec import list_tasks

    if args.list:
        return _print_task_list(list_tasks(), args.json)
    if not args.checkpoint or not args.tasks:
        raise UserError("give a CHECKPOINT and --tasks NAME_OR_YAML... (see `nanoforge eval tasks --list`)")
    from nanoforge.eval.tasks import run_tasks

    report = run_tasks(args.checkpoint, args.tasks, limit=args.limit, num_fewshot=args.num_fewshot, out=args.out,
                       tokenizer=args.tokenizer, device=args.device, batch_tokens=args.batch_tokens)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    return _print_results(report, args.out)


def _chat(args: argparse.Namespace) -> int:
    from nanoforge.errors import UserError
    from nanoforge.eval.chat import eval_chat, list_chat_tasks

    if args.list:
        return _print_task_list(list_chat_tasks(), args.json)
    if not args.checkpoint or not args.tasks:
        raise UserError("give a CHECKPOINT and --tasks NAME_OR_YAML... (see `nanoforge eval chat --list`)")
    report = eval_chat(args.checkpoint, args.tasks, limit=args.limit, out=args.out, tokenizer=args.tokenizer,
                       device=args.device, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    return _print_results(report, args.out)


def _compare(args: argparse.Namespace) -> int:
    from nanoforge.eval.compare import compare_results
    from nanoforge.home import atomic_write_text

    table = compare_results(args.results, fmt=args.format, stderr=args.stderr, metrics=args.metrics,
                            names=args.names)
    print(table, end="")
    if args.out:
        atomic_write_text(args.out, table)
    return 0


def _lm_eval(args: argparse.Namespace) -> int:
    from nanoforge.errors import UserError

    try:
        import nanoforge.eval.lm_adapter as adapter  # registers --model nanoforge
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("lm_eval"):
            raise
        raise UserError("lm-evaluation-harness is not installed: pip install 'nanoforge[eval]' "
                        "(or 'lm-eval[hf]')") from None
    return adapter.run_lm_eval_cli(list(args.lm_eval_args))


def _print_task_list(rows: list[dict], as_json: bool) -> int:
    """`--list`: one line per bundled task (name, output type, what it measures), or the rows as JSON."""
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['task']:<20} {r['output_type']:<16} {r['about']}")
    return 0


def _print_results(report: dict, out: str | None) -> int:
    """One line per task and metric of an lm-eval-layout report: value ± stderr, n, and the scoring speed
    where the report has it (eval tasks); aggregate rows without a stderr (ChatCORE) print the value alone."""
    speeds = report.get("nanoforge", {}).get("tasks", {})
    for task, row in report["results"].items():
        n = report["n-samples"].get(task, {}).get("effective")
        eps = speeds.get(task, {}).get("examples_per_second")
        for key, v in row.items():
            if key == "alias" or "_stderr" in key:
                continue
            metric, filt = key.split(",", 1)
            se = row.get(f"{metric}_stderr,{filt}")
            name = metric if filt == "none" else f"{metric} ({filt})"
            print(f"{task:<20} {name:<30} {v:.4f}" + (f" ± {se:.4f}   n={n}" if se is not None else "")
                  + (f"  {eps:.1f} examples/s" if eps is not None else ""))
    if out:
        print(f"results: {out}")
    return 0
