"""Our own byte-level BPE trainer in Python (numpy for the initial pair counts): the readable reference and the
oracle for the fast backends.

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

import numpy as np
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


def _initial_state(chunk_counts: dict[str, int]
                   ) -> tuple[list[str], list[int], defaultdict[str, int], dict[str, list[int]]]:
    """Words (one character per token id: a chunk's UTF-8 bytes read as latin-1), their counts, the count
    of every adjacent pair and, per pair, the words holding it (ascending, each once). Counted with numpy:
    one stable sort of all ~1M adjacent pairs, instead of a Python loop over them."""
    chunks: list[bytes] = []
    counts: list[int] = []
    for chunk, c in chunk_counts.items():
        b = chunk.encode("utf-8")
        if len(b) >= 2:
            chunks.append(b)
            counts.append(c)
    words = [b.decode("latin-1") for b in chunks]
    if not chunks:
        return words, counts, defaultdict(int), {}
    lens = np.fromiter(map(len, chunks), dtype=np.int64, count=len(chunks))
    ids = np.frombuffer(b"".join(chunks), dtype=np.uint8).astype(np.int64)
    inside = np.ones(len(ids) - 1, dtype=bool)  # drop the pairs that straddle two words
    inside[np.cumsum(lens)[:-1] - 1] = False
    pairs = ((ids[:-1] << _SHIFT) | ids[1:])[inside]
    word = np.repeat(np.arange(len(chunks), dtype=np.int64), lens)[:-1][inside]
    order = np.argsort(pairs, kind="stable")  # by pair, then by word: positions are in word order
    pairs, word = pairs[order], word[order]
    first = np.empty(len(pairs), dtype=bool)  # first position of each distinct pair
    first[0] = True
    np.not_equal(pairs[1:], pairs[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    totals = np.add.reduceat(np.asarray(counts, dtype=np.int64)[word], starts)
    once = first.copy()  # first position of each distinct (pair, word)
    once[1:] |= word[1:] != word[:-1]
    holders = np.split(word[once], np.flatnonzero(first[once])[1:])
    keys = [chr(p >> _SHIFT) + chr(p & _MASK) for p in pairs[starts].tolist()]
    return words, counts, defaultdict(int, zip(keys, totals.tolist())), dict(zip(keys, (h.tolist() for h in holders)))


def _heap_key(pair: str, count: int) -> int:
    return (-count << _CSHIFT) | (ord(pair[0]) << _SHIFT) | ord(pair[1])


def train_bpe(chunk_counts: dict[str, int], num_merges: int) -> list[tuple[int, int]]:
    """The first `num_merges` merges (fewer when no pair is left) of byte-level BPE on these chunk counts.

    A word is a str with one character per token (chr(id)), so finding a pair and rewriting a word are
    `str.find` and `str.replace` in C (leftmost, non-overlapping: BPE's own order, also for runs of a == b);
    a pair is the 2-character string of its ids. Per merge, the pair-count changes are summed per
    neighbour token first and applied once per distinct neighbour, not once per occurrence."""
    words, counts, pair_counts, where = _initial_state(chunk_counts)
    heap = [_heap_key(p, c) for p, c in pair_counts.items() if c > 0]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []
    heappop, heappush = heapq.heappop, heapq.heappush
    while len(merges) < num_merges and heap:
        key = heappop(heap)
        a, b = (key >> _SHIFT) & _MASK, key & _MASK
        ab = chr(a) + chr(b)
        current = pair_counts.get(ab, 0)
        if -(key >> _CSHIFT) != current:  # stale entry: re-push with the current count
            if current > 0:
                heappush(heap, _heap_key(ab, current))
            continue
        A, B, N = ab[0], ab[1], chr(256 + len(merges))
        merges.append((a, b))
        # (x, a) -> (x, new) and (b, y) -> (new, y): summed per neighbour x / y, with the words they occur in.
        left_count: defaultdict[str, int] = defaultdict(int)
        left_words: defaultdict[str, list[int]] = defaultdict(list)
        right_count: defaultdict[str, int] = defaultdict(int)
        right_words: defaultdict[str, list[int]] = defaultdict(list)
        for wi in where.pop(ab):
            w = words[wi]
            i = w.find(ab)
            if i < 0:  # no longer holds the pair (an earlier merge took one of its halves), or listed twice
                continue
            c = counts[wi]
            n = len(w)
            prev_end = -1
            while i >= 0:
                if i:  # two adjacent occurrences: the left neighbour is the new token itself
                    x = N if i == prev_end else w[i - 1]
                    left_count[x] += c
                    left_words[x].append(wi)
                j = i + 2
                if j < n:
                    y = w[j]
                    right_count[y] += c
                    right_words[y].append(wi)
                prev_end = j
                i = w.find(ab, j)
            words[wi] = w.replace(ab, N)
        # The keys cannot collide: x + N == N + y would need y == N, and y comes from the word before the merge.
        new_pairs: dict[str, list[int]] = {}
        for x, c in left_count.items():
            pair_counts[x + A] -= c
            pair_counts[x + N] += c
            new_pairs[x + N] = left_words[x]
        for y, c in right_count.items():
            pair_counts[B + y] -= c
            pair_counts[N + y] += c
            new_pairs[N + y] = right_words[y]
        pair_counts[ab] = 0  # every occurrence was merged (for a == b, runs leave no (a, a) behind)
        # Every new pair holds the new token, so this merge made all of its occurrences: its word list is
        # complete, and its count is final until one of its halves is merged away.
        for p, holders in new_pairs.items():
            c = pair_counts[p]
            if c > 0:
                where[p] = holders
                heappush(heap, _heap_key(p, c))
    return merges


def merges_to_ranks(merges: list[tuple[int, int]]) -> dict[bytes, int]:
    """tiktoken ranks: the 256 bytes, then each merge's bytes with rank 256 + its index."""
    token_bytes = [bytes([i]) for i in range(256)]
    for a, b in merges:
        token_bytes.append(token_bytes[a] + token_bytes[b])
    return {t: i for i, t in enumerate(token_bytes)}
