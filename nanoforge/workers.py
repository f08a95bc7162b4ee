"""The multiprocessing context for worker processes (tokenize, BPE pre-tokenization), and what happens when
one of them dies.

Workers start from a fork server (spawn where there is none), never forked from the calling process: after
earlier stages it has threads (BLAS, rayon, pyarrow) whose locks a forked child can inherit held, and then
hangs. A worker that is killed (the kernel's out-of-memory killer, a signal) must not leave the parent
waiting forever for a result that will never come: `put` and `get` wait in short slices and check that
every worker is still alive, `imap` runs a pool that fails when one of its processes dies, and `WorkerDied`
says what stopped and how. Standard library only (and nanoforge.errors), so that importing it costs a
worker nothing.
"""

from __future__ import annotations

import multiprocessing
import queue
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.context import BaseContext
from typing import Any

from nanoforge.errors import NanoforgeError

POLL_S = 0.5
ADVICE = "nothing was written, run the command again"


class WorkerDied(NanoforgeError):
    """A worker process ended abnormally; the work it held is lost (the caller's output is not written)."""


def worker_context(preload: Sequence[str] = ()) -> BaseContext:
    """A forkserver context (`preload`: modules the fork server imports once for every worker), or spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    if preload:
        ctx.set_forkserver_preload(list(preload))
    return ctx


def how_it_ended(exitcode: int | None) -> str:
    """'exit code 3', 'killed by SIGKILL (out of memory?)', ... for a process's exitcode."""
    if exitcode is None:
        return "still running"
    if exitcode >= 0:
        return f"exit code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    return f"killed by {name}" + (" (out of memory?)" if -exitcode == signal.SIGKILL else "")


def check_alive(workers: Sequence[Any], what: str, advice: str = ADVICE) -> None:
    """Raise WorkerDied if any of `workers` (multiprocessing.Process) ended with a non-zero exit code;
    `what` names the work, `advice` (what is kept, what to do) ends the message."""
    for i, w in enumerate(workers):
        if w.exitcode not in (None, 0):
            raise WorkerDied(f"{what}: worker {i + 1} of {len(workers)} (pid {w.pid}) {how_it_ended(w.exitcode)}; "
                             f"{advice}")


def put(q: Any, item: Any, workers: Sequence[Any], what: str, advice: str = ADVICE) -> None:
    """q.put(item), checking the workers between waits (a full queue whose readers died never drains)."""
    while True:
        try:
            q.put(item, timeout=POLL_S)
            return
        except queue.Full:
            check_alive(workers, what, advice)


def get(q: Any, workers: Sequence[Any], what: str, advice: str = ADVICE) -> Any:
    """q.get(), checking the workers between waits (a dead worker never sends its result)."""
    while True:
        try:
            return q.get(timeout=POLL_S)
        except queue.Empty:
            check_alive(workers, what, advice)


def imap(fn: Callable[[Any], Any], items: Iterable[Any], processes: int, what: str, advice: str = ADVICE, *,
         initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> Iterator[Any]:
    """fn(item) for each item in `processes` worker processes, in order, at most 2 × processes items ahead
    of the consumer (so results never pile up in memory). A worker that dies raises WorkerDied at once,
    where multiprocessing.Pool would replace it and wait forever for the lost result."""
    pool = ProcessPoolExecutor(processes, mp_context=worker_context(), initializer=initializer, initargs=initargs)
    pending: deque = deque()
    done = False
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * processes:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
        done = True
    except BrokenProcessPool:
        codes = [how_it_ended(p.exitcode) for p in _processes(pool) if p.exitcode not in (None, 0)]
        raise WorkerDied(f"{what}: a worker process ended abruptly ({', '.join(codes) or 'killed'}); {advice}") from None
    finally:
        if not done:  # interrupted, an error, or the consumer stopped: do not wait for the queued work
            for p in _processes(pool):
                p.terminate()
        pool.shutdown(wait=done, cancel_futures=True)


def _processes(pool: ProcessPoolExecutor) -> list[Any]:
    """The pool's worker processes (a private attribute: empty if a Python version lacks it)."""
    return list((getattr(pool, "_processes", None) or {}).values())
