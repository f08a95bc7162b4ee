"""`nanoforge train base|mid|sft|rl` and `nanoforge checkpoints list`."""

from __future__ import annotations

import argparse
import json
import signal
import sys

from nanoforge.cli import subparser


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train a model (base, mid, sft)")
    tsub = train.add_subparsers(dest="train_command", metavar="<command>")
    base = subparser(tsub, "base", "pretrain a base model on token shards",
                     "nanoforge train base --preset cpu-demo --tokens de4k --tag demo --set train.max_steps=100")
    base.add_argument("--preset", default=None, help="a preset from nanoforge/presets (cpu-demo, ci, nano-125m, d12, d20)")
    base.add_argument("--config", default=None, help="a TOML config file (applied after the preset)")
    base.add_argument("--tokens", required=True, help="token shards: a name under tokens/ or a folder")
    base.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="override a config value (repeatable), e.g. --set train.lr=1e-3")
    base.add_argument("--depth", type=int, default=None, help="shorthand for --set model.depth=N")
    base.add_argument("--tag", default=None, help="checkpoint folder name (checkpoints/base/TAG); default: the preset")
    base.add_argument("--run", default=None, help="run folder name (runs/RUN); default: base-TAG")
    base.add_argument("--resume", action="store_true", help="continue the latest checkpoint of --tag exactly")
    base.add_argument("--json", action="store_true", help="print the summary as JSON")
    base.set_defaults(func=_train_base)

    for phase, what, example in (
            ("sft", "supervised fine-tuning of a base (or mid) checkpoint on conversations",
             "nanoforge train sft --from demo --data default --tag demo"),
            ("mid", "mid-training of a base checkpoint on a chat mixture (every token learned)",
             "nanoforge train mid --from demo --data mixture.toml --tag demo")):
        p = subparser(tsub, phase, what, example)
        p.add_argument("--from", dest="from_checkpoint", required=True,
                       help="the checkpoint to start from: a tag name, tag folder or model file")
        p.add_argument("--data", required=True,
                       help="conversations: a JSONL/JSON/parquet file, a mixture TOML, a folder with train/ (and val/), "
                       "or 'default' (the offline default chat data)")
        p.add_argument("--val", default=None, help="held-out conversations for validation (default: the data's val/ "
                       "split, else sft.val_conversations held out of --data)")
        p.add_argument("--config", default=None, help="a TOML config file (applied after the phase defaults)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value (repeatable), e.g. --set train.max_steps=50")
        p.add_argument("--tag", default=None, help=f"checkpoint folder name (checkpoints/{phase}/TAG); "
                       f"default: the --from tag")
        p.add_argument("--run", default=None, help=f"run folder name (runs/RUN); default: {phase}-TAG")
        p.add_argument("--resume", action="store_true", help="continue the latest checkpoint of --tag exactly")
        p.add_argument("--json", action="store_true", help="print the summary as JSON")
        p.set_defaults(func=_train_chat, phase=phase)

    rl = subparser(tsub, "rl", "reinforcement learning on verifiable rewards (GRPO-style) from a chat checkpoint",
                   "nanoforge train rl --from checkpoints/sft/demo --tag demo --set rl.max_steps=50")
    rl.add_argument("--from", dest="from_checkpoint", required=True,
                    help="the chat (sft) checkpoint to start from: a tag folder, a model file or a tag name")
    rl.add_argument("--data", default=None,
                    help="problems: chat data whose assistant answers end in '#### n' (JSONL/JSON/parquet, a "
                         "mixture TOML, a folder with train/ and val/, or `default`: the offline arithmetic "
                         "problems of the default chat data, also used when --data is not given)")
    rl.add_argument("--val", default=None, help="held-out problems for pass@k (default: the val/ split, else "
                                                "rl.eval_prompts problems held out of --data)")
    rl.add_argument("--tag", required=True, help="checkpoint folder name (checkpoints/rl/TAG)")
    rl.add_argument("--config", default=None, help="a TOML config file applied over the RL defaults")
    rl.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config value (repeatable), e.g. --set rl.group_size=16")
    rl.add_argument("--run", default=None, help="run folder name (runs/RUN); default: rl-TAG")
    rl.add_argument("--resume", action="store_true", help="continue the latest checkpoint of --tag exactly")
    rl.add_argument("--allow-base", action="store_true", help="start from a base checkpoint (only warns)")
    rl.add_argument("--json", action="store_true", help="print the summary as JSON")
    rl.set_defaults(func=_train_rl)

    ck = sub.add_parser("checkpoints", help="list checkpoints")
    csub = ck.add_subparsers(dest="checkpoints_command", metavar="<command>")
    ls = subparser(csub, "list", "list checkpoints: phase, tag, steps, val bpb", "nanoforge checkpoints list --json")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_list)


def _train_base(args: argparse.Namespace) -> int:
    from nanoforge.config import load_config
    from nanoforge.errors import UserError
    from nanoforge.train.loop import train

    if not args.preset and not args.config:
        raise UserError("give --preset NAME or --config FILE (presets: cpu-demo, ci, nano-125m, d12, d20)")
    overrides = list(args.overrides) + ([f"model.depth={args.depth}"] if args.depth else [])
    cfg = load_config(preset=args.preset, path=args.config, overrides=overrides)
    tag = args.tag or args.preset or "default"
    summary = train(cfg, tokens=args.tokens, tag=tag, run=args.run, phase="base", resume=args.resume)
    if summary.get("rank", 0) == 0:
        if args.json:
            print(json.dumps(summary, indent=2))
        elif summary.get("already_complete"):
            print(f"checkpoint tag '{tag}' is already complete at step {summary['step']}/{summary['max_steps']}: "
                  f"nothing to do (raise train.max_steps to train it further)")
            print(f"checkpoint: {summary['checkpoint']}")
        else:
            bpb, tps = summary["val_bpb"], summary["tokens_per_second"]
            print(f"step {summary['step']}/{summary['max_steps']}  loss {summary['loss']:.4f}  "
                  f"val bpb {bpb if bpb is None else round(bpb, 4)}  "
                  f"{'-' if tps is None else f'{tps:,.0f}'} tokens/s")
            print(f"checkpoint: {summary['checkpoint']}")
            print(f"metrics:    {summary['metrics']}")
    return _exit_code(summary)


def _train_chat(args: argparse.Namespace) -> int:
    from nanoforge.checkpoint import resolve_checkpoint
    from nanoforge.train.sft import train_sft

    tag = args.tag or resolve_checkpoint(args.from_checkpoint)[0].name
    summary = train_sft(args.from_checkpoint, args.data, tag=tag, phase=args.phase, val=args.val,
                        config=args.config, overrides=args.overrides, run=args.run, resume=args.resume)
    if summary.get("rank", 0) == 0:
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            def num(key: str) -> str:
                v = summary.get(key)
                return "-" if v is None else f"{v:.4f}"

            print(f"step {summary['step']}/{summary['max_steps']}  loss {num('loss')}  "
                  f"held-out loss {num('base_val_loss')} -> {num('val_loss')}  "
                  f"bpb {num('base_val_bpb')} -> {num('val_bpb')}  {summary['tokens_per_second']:,.0f} tokens/s")
            print(f"conversations: {summary['conversations']} ({summary['truncated']} truncated to a row, "
                  f"{summary['dropped']} without a learned token dropped), {summary['val_conversations']} held out; "
                  f"{summary['skipped_steps']} steps skipped")
            print(f"checkpoint: {summary['checkpoint']}")
            print(f"metrics:    {summary['metrics']}")
    return _exit_code(summary)


def _train_rl(args: argparse.Namespace) -> int:
    from nanoforge.train.rl import train_rl

    summary = train_rl(args.from_checkpoint, args.data, tag=args.tag, val=args.val, config=args.config,
                       overrides=args.overrides, run=args.run, resume=args.resume, allow_base=args.allow_base)
    if summary.get("rank", 0) == 0:
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            k = summary.get("k", 1)

            def pk(suffix: str) -> str:
                v, e = summary.get(f"pass@1{suffix}"), summary.get(f"pass@1_stderr{suffix}")
                return "n/a" if v is None else f"{v:.3f} ± {e:.3f} (pass@{k} {summary.get(f'pass@{k}{suffix}', 0):.3f})"

            gain = summary.get("pass@1_gain")
            paired = "" if gain is None else f"  (gain {gain:+.3f} ± {summary.get('pass@1_gain_stderr', 0):.3f} paired)"
            print(f"step {summary['step']}/{summary['max_steps']}  mean reward {summary.get('reward_mean', 0):.3f}  "
                  f"held-out pass@1 {pk('_start')} -> {pk('')}{paired}")
            print(f"checkpoint: {summary['checkpoint']}")
            print(f"metrics:    {summary['metrics']}")
    return _exit_code(summary)


def _list(args: argparse.Namespace) -> int:
    from nanoforge.checkpoint import list_checkpoints

    rows = list_checkpoints()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no checkpoints yet (train one with `nanoforge train base`)")
        return 0
    print(f"{'phase':<6} {'tag':<24} {'step':>8} {'val bpb':>8}  {'steps kept':<20} tokens")
    for r in rows:
        bpb = f"{r['val_bpb']:.4f}" if r["val_bpb"] is not None else "-"
        steps = ",".join(map(str, r["steps"])) + ("" if r["complete"] else " (torn)")
        print(f"{r['phase']:<6} {r['tag']:<24} {r['step']:>8} {bpb:>8}  {steps:<20} {r['tokens'] or '-'}")
    return 0


def _exit_code(summary: dict) -> int:
    """0, or 128 + the signal that interrupted the training (a checkpoint was written: say how to go on)."""
    if summary["interrupted"]:
        print(f"interrupted ({signal.Signals(summary['interrupted']).name}); continue with --resume",
              file=sys.stderr)
        return 128 + int(summary["interrupted"])
    return 0
