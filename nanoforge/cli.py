"""`nanoforge <group> <command>`: the command-line entry point (also `python -m nanoforge`).

Thin by design: each command group lives in its own `commands.py` beside the library code it calls,
with a `register(subparsers)` function that adds its parsers and sets `func` to a handler
`handler(args) -> int | None`. Handlers import heavy modules lazily so `--help` stays fast.
Errors: a `UserError` prints one line and exits 2, any other `NanoforgeError` exits 1, Ctrl-C 130;
SIGTERM is handled like Ctrl-C (the same cleanup runs) and exits 143.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys

from nanoforge import __version__
from nanoforge.errors import NanoforgeError, Terminated

# Modules that contribute commands, in the order `--help` lists them.
COMMAND_MODULES = [
    "nanoforge.tokenizer.commands",   # tokenizer train|eval|export-hf|import-hf|import-nanochat
    "nanoforge.data.commands",        # data download|import|tokenize, plan
    "nanoforge.train.commands",       # train base|sft|rl, checkpoints list
    "nanoforge.eval.commands",        # eval bpb|tasks|compare, lm-eval
    "nanoforge.export.commands",      # export hf, import hf|nanochat
    "nanoforge.hub_commands",         # pull, push
    "nanoforge.infer.commands",       # sample, chat, serve
    "nanoforge.pipeline.commands",    # speedrun, ablate
]


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanoforge", formatter_class=_Formatter,
        description="From raw text to your own small language model.",
        epilog="example:\n  nanoforge tokenizer train --data ~/corpus/de --vocab-size 32768 --backend rustbpe --name de32k",
    )
    parser.add_argument("--version", action="version", version=f"nanoforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<group>")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a stage not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from nanoforge import progress

    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    progress.enable()
    previous = _handle_sigterm()
    try:
        rc = args.func(args)
    except NanoforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in _SYSTEM_ERRORS:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror.lower()}{where}", file=sys.stderr)
        return 2 if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return int(rc or 0)


# The machine's answer, not a bug: a full disk, a read-only or foreign-owned folder.
_SYSTEM_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def _handle_sigterm():  # noqa: ANN202 - returns the previous handler (or None off the main thread)
    """SIGTERM raises `Terminated` (a KeyboardInterrupt) in this process, so `finally` blocks clean up as on
    Ctrl-C. Forked workers inherit the handler and just die, as they would without it."""
    main_pid = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != main_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Terminated

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def subparser(sub: argparse._SubParsersAction, name: str, help: str, example: str) -> argparse.ArgumentParser:
    """Add a command whose --help shows one description line and a copy-pasteable example."""
    return sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}",
                          formatter_class=_Formatter)


if __name__ == "__main__":
    sys.exit(main())
