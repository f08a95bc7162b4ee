"""CLI: `nanoforge speedrun` and `nanoforge ablate` (the library calls live in speedrun.py and ablate.py)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from nanoforge.cli import subparser


def register(sub: argparse._SubParsersAction) -> None:
    p = subparser(sub, "speedrun", "text -> tokenizer -> tokens -> base model -> SFT -> RL chat model, evaluated, exported + report",
                  "nanoforge speedrun --preset cpu-demo --data ../shared/corpus/de --until sft")
    p.add_argument("--preset", default="cpu-demo", help="config preset (nanoforge/presets/*.toml)")
    p.add_argument("--config", default=None, help="a TOML config file applied over the preset")
    p.add_argument("--data", default=None,
                   help="a folder/file of .parquet/.jsonl/.txt, or hf:REPO[:SHARDS]; default: the offline "
                        "corpus of Python standard-library docstrings")
    p.add_argument("--run", "--name", dest="run", default=None,
                   help="run name (runs/<NAME>); default derived from preset and data. Under torchrun write "
                        "--name: torchrun takes --run for an abbreviation of its own --run-path")
    p.add_argument("--fresh", action="store_true", help="redo every stage even when its outputs are up to date")
    p.add_argument("--until", choices=("base", "sft", "rl"), default=None,
                   help="the last training stage: base (pretraining only), sft or rl; default: the preset's "
                        "speedrun.until (rl for cpu-demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. train.max_steps=50 or rl.group_size=16 (repeatable)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_speedrun)

    a = subparser(sub, "ablate", "run a grid of speedruns (shared stages trained once) and compare them",
                  "nanoforge ablate examples/ablate-tokenizer-lr.toml")
    a.add_argument("grid", help="grid TOML: [base] preset/data/set, [axes] key = [values, ...]")
    a.add_argument("--name", default=None, help="grid name (runs/<NAME>/); default: the file's stem")
    a.add_argument("--data", default=None, help="overrides the grid's data source")
    a.add_argument("--fresh", action="store_true", help="redo every stage of every cell")
    a.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every cell (repeatable)")
    a.add_argument("--json", action="store_true", help="print the comparison as JSON")
    a.set_defaults(func=_ablate)


def _speedrun(args: Any) -> int:
    from nanoforge.pipeline.speedrun import speedrun

    summary = speedrun(args.preset, data=args.data, run=args.run, fresh=args.fresh, overrides=args.overrides,
                       config=args.config, until=args.until)
    if args.json:  # otherwise the log already ended with the report's path and a command to try the model
        print(json.dumps(summary, indent=2))
    return 0


def _ablate(args: Any) -> int:
    from nanoforge.pipeline.ablate import ablate

    result = ablate(args.grid, name=args.name, data=args.data, fresh=args.fresh, overrides=args.overrides)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(result["table_md"])
        print(f"\ntable: {result['table']}\nplot: {result['plot']}")
    return 0
