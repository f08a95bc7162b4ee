"""Our own byte-level BPE trainer in pure Python: the readable reference and the oracle for the fast backends.

    counts = count_chunks(texts, pattern)            # regex pre-tokenization over 2 processes
    merges = train_bpe(counts, num_merges)           # [(left_id, right_id), ...]; merge i makes id 256 + i

It produces exactly the merges rustbpe produces on the same input. rustbpe's rule (src/lib.rs,
`impl Ord for MergeJob`): take the pair with the highest count; among equal counts the *smallest* pair
(left id, then right id), because its max-heap orders ties by `other.pair.cmp(&self.pair)`. Counts are
kept exact incrementally, and a pair's occurrences are all created by one merge (every new pair contains
the new id), so a lazy heap whose stale entries are re-pushed with the current count pops exactly that
pair. We encode a heap entry as one int, `-count << 40 | left << 20 | right`, so Python's heapq compares
ints instead of tuples: smaller key = higher count, then smaller pair.
"""

from __future__ import annotations

import heapq
import os
import signal
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from multiprocessing import get_context
from typing import Any

import regex

_SHIFT = 20            # ids < 2**20 (a 1M vocabulary); a pair is left << 20 | right
_MASK = (1 << _SHIFT) - 1
_CSHIFT = 2 * _SHIFT   # heap key = -count << 40 | pair

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
    ctx = get_context("fork" if hasattr(os, "fork") else "spawn")
    inbox, outbox = ctx.Queue(maxsize=4 * processes), ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(pattern, inbox, outbox), daemon=True) for _ in range(processes)]
    for w in workers:
        w.start()
    try:
        for b in _batches(texts, batch_chars):
            inbox.put(b)
        for _ in workers:
            inbox.put(None)
        results = sorted((outbox.get() for _ in workers), key=len, reverse=True)
        total = Counter(results[0])
        for r in results[1:]:
            total.update(r)
        for w in workers:
            w.join()
    finally:
        if any(w.is_alive() for w in workers):  # interrupted: stop the workers, drop what is still queued
            inbox.cancel_join_thread()
            for w in workers:
                w.terminate()
                w.join()
    return total


def train_bpe(chunk_counts: dict[str, int], num_merges: int) -> list[tuple[int, int]]:
    """The first `num_merges` merges (fewer when no pair is left) of byte-level BPE on these chunk counts."""
    words: list[list[int]] = []
    counts: list[int] = []
    for chunk, c in chunk_counts.items():
        b = chunk.encode("utf-8")
        if len(b) >= 2:
            words.append(list(b))
            counts.append(c)

    # Initial pair counts, and for each pair the words it occurs in (a list; a word may repeat or no longer
    # hold the pair: visiting it then finds nothing, which is cheaper than keeping sets exact).
    pair_counts: defaultdict[int, int] = defaultdict(int)
    where: dict[int, list[int]] = {}
    for wi, w in enumerate(words):
        c = counts[wi]
        for p in {x << _SHIFT | y for x, y in zip(w, w[1:])}:
            s = where.get(p)
            if s is None:
                where[p] = [wi]
            else:
                s.append(wi)
        for x, y in zip(w, w[1:]):
            p = x << _SHIFT | y
            pair_counts[p] += c
    heap = [(-c << _CSHIFT) | p for p, c in pair_counts.items() if c > 0]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    heappop, heappush = heapq.heappop, heapq.heappush
    S = _SHIFT  # a local: the hot loop reads it millions of times
    while len(merges) < num_merges and heap:
        key = heappop(heap)
        pair = key & ((1 << _CSHIFT) - 1)
        count = -(key >> _CSHIFT)
        current = pair_counts.get(pair, 0)
        if count != current:  # stale entry: re-push with the current count
            if current > 0:
                heappush(heap, (-current << _CSHIFT) | pair)
            continue
        a, b = pair >> S, pair & _MASK
        new = 256 + len(merges)
        merges.append((a, b))
        b_hi, new_hi = b << S, new << S
        new_pairs: defaultdict[int, list[int]] = defaultdict(list)
        for wi in where.pop(pair):
            w = words[wi]
            k = w.count(a)  # occurrences of `a` left to look at (no exceptions in the hot loop)
            if not k:
                continue
            n = len(w)
            c = counts[wi]
            out = None
            start = pos = 0
            while k:
                i = w.index(a, pos)
                k -= 1
                if i + 1 < n and w[i + 1] == b:
                    if out is None:
                        out = w[:i]
                    else:
                        out.extend(w[start:i])
                    if out:  # left neighbour x: (x, a) -> (x, new)
                        x = out[-1] << S
                        pair_counts[x | a] -= c
                        p = x | new
                        pair_counts[p] += c
                        new_pairs[p].append(wi)
                    if i + 2 < n:  # right neighbour y: (b, y) -> (new, y)
                        y = w[i + 2]
                        pair_counts[b_hi | y] -= c
                        p = new_hi | y
                        pair_counts[p] += c
                        new_pairs[p].append(wi)
                    out.append(new)
                    if a == b:  # the `a` at i + 1 is consumed
                        k -= 1
                    start = pos = i + 2
                else:
                    pos = i + 1
            if out is not None:
                out.extend(w[start:])
                words[wi] = out
        pair_counts[pair] = 0  # every occurrence was merged (for a == b, runs leave no (a, a) behind)
        for p, s in new_pairs.items():
            cnt = pair_counts.get(p, 0)
            if cnt > 0:
                where[p] = s
                heappush(heap, (-cnt << _CSHIFT) | p)
    return merges


def merges_to_ranks(merges: list[tuple[int, int]]) -> dict[bytes, int]:
    """tiktoken ranks: the 256 bytes, then each merge's bytes with rank 256 + its index."""
    token_bytes = [bytes([i]) for i in range(256)]
    for a, b in merges:
        token_bytes.append(token_bytes[a] + token_bytes[b])
    return {t: i for i, t in enumerate(token_bytes)}
