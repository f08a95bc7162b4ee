"""The multiprocessing context for worker processes (tokenize, BPE pre-tokenization).

Workers start from a fork server (spawn where there is none), never forked from the calling process: after
earlier stages it has threads (BLAS, rayon, pyarrow) whose locks a forked child can inherit held, and then
hangs. Standard library only, so that importing it costs a worker nothing.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from multiprocessing.context import BaseContext


def worker_context(preload: Sequence[str] = ()) -> BaseContext:
    """A forkserver context (`preload`: modules the fork server imports once for every worker), or spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    if preload:
        ctx.set_forkserver_preload(list(preload))
    return ctx
