"""Regex pre-tokenization for BPE training: count every chunk of a stream of texts in worker processes.

    counts = count_chunks(texts, pattern)            # Counter: chunk -> how often it occurs

Its own module, importing only regex, so that the workers start in a fraction of a second.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import regex

from nanoforge import workers as mp


def _count_texts(pat: regex.Pattern, texts: list[str], into: Counter[str]) -> None:
    for t in texts:
        into.update(pat.findall(t))


def _worker(pattern: str, inbox: Any, outbox: Any) -> None:
    """Count the chunks of every batch from `inbox` until None; send the total once (few big merges)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which terminates us
    pat = regex.compile(pattern)
    counts: Counter[str] = Counter()
    for texts in iter(inbox.get, None):
        _count_texts(pat, texts, counts)
    outbox.put(dict(counts))


def _batches(texts: Iterable[str], batch_chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    n = 0
    for t in texts:
        batch.append(t)
        n += len(t)
        if n >= batch_chars:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def count_chunks(texts: Iterable[str], pattern: str, *, processes: int = 2,
                 batch_chars: int = 1 << 19) -> Counter[str]:
    """Count every regex chunk of every text; the splitting runs in `processes` worker processes while
    this one reads the documents."""
    total: Counter[str] = Counter()
    if processes <= 1:
        pat = regex.compile(pattern)
        for b in _batches(texts, batch_chars):
            _count_texts(pat, b, total)
        return total
    # The workers import only this module (and regex), which is why it lives outside nanoforge.tokenizer
    # (numpy, tiktoken); nanoforge.workers says why they are never forked from this process.
    ctx = mp.worker_context(["__main__", __name__])
    inbox, outbox = ctx.Queue(maxsize=4 * processes), ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(pattern, inbox, outbox), daemon=True) for _ in range(processes)]
    for w in workers:
        w.start()
    what = "BPE pre-tokenization"
    try:
        for b in _batches(texts, batch_chars):
            mp.put(inbox, b, workers, what)
        for _ in workers:
            mp.put(inbox, None, workers, what)
        results = sorted((mp.get(outbox, workers, what) for _ in workers), key=len, reverse=True)
        total = Counter(results[0])
        for r in results[1:]:
            total.update(r)
        for w in workers:
            w.join()
    finally:
        if any(w.is_alive() for w in workers):  # interrupted or a worker died: stop the workers, drop what is still queued
            inbox.cancel_join_thread()
            for w in workers:
                w.terminate()
                w.join()
    return total
