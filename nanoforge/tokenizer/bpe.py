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
from collections import Counter
from collections.abc import Iterable, Iterator
from multiprocessing import get_context

import regex

_SHIFT = 20            # ids < 2**20 (a 1M vocabulary); a pair is left << 20 | right
_MASK = (1 << _SHIFT) - 1
_CSHIFT = 2 * _SHIFT   # heap key = -count << 40 | pair

_pattern_cache: dict[str, regex.Pattern] = {}


def _count_batch(args: tuple[str, list[str]]) -> dict[str, int]:
    pattern, texts = args
    pat = _pattern_cache.get(pattern)
    if pat is None:
        pat = _pattern_cache[pattern] = regex.compile(pattern)
    c: Counter[str] = Counter()
    for t in texts:
        c.update(pat.findall(t))
    return c


def _batches(pattern: str, texts: Iterable[str], batch_chars: int) -> Iterator[tuple[str, list[str]]]:
    batch: list[str] = []
    n = 0
    for t in texts:
        batch.append(t)
        n += len(t)
        if n >= batch_chars:
            yield pattern, batch
            batch, n = [], 0
    if batch:
        yield pattern, batch


def count_chunks(texts: Iterable[str], pattern: str, *, processes: int = 2,
                 batch_chars: int = 1 << 20) -> Counter[str]:
    """Count every regex chunk of every text; the splitting runs in `processes` worker processes."""
    total: Counter[str] = Counter()
    batches = _batches(pattern, texts, batch_chars)
    if processes <= 1:
        for b in batches:
            total.update(_count_batch(b))
        return total
    with get_context("fork" if hasattr(__import__("os"), "fork") else "spawn").Pool(processes) as pool:
        for i, c in enumerate(pool.imap(_count_batch, batches)):
            if i == 0:
                total = c
            else:
                total.update(c)
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
    pair_counts: dict[int, int] = {}
    where: dict[int, list[int]] = {}
    get = pair_counts.get
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
            pair_counts[p] = get(p, 0) + c
    heap = [(-c << _CSHIFT) | p for p, c in pair_counts.items() if c > 0]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    heappop, heappush = heapq.heappop, heapq.heappush
    while len(merges) < num_merges and heap:
        key = heappop(heap)
        pair = key & ((1 << _CSHIFT) - 1)
        count = -(key >> _CSHIFT)
        current = pair_counts.get(pair, 0)
        if count != current:  # stale entry: re-push with the current count
            if current > 0:
                heappush(heap, (-current << _CSHIFT) | pair)
            continue
        a, b = pair >> _SHIFT, pair & _MASK
        new = 256 + len(merges)
        merges.append((a, b))
        new_pairs: dict[int, list[int]] = {}
        npget = new_pairs.get
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
                        x = out[-1]
                        pair_counts[x << _SHIFT | a] -= c
                        p = x << _SHIFT | new
                        pair_counts[p] = get(p, 0) + c
                        s = npget(p)
                        if s is None:
                            new_pairs[p] = [wi]
                        else:
                            s.append(wi)
                    pair_counts[pair] -= c
                    if i + 2 < n:  # right neighbour y: (b, y) -> (new, y)
                        y = w[i + 2]
                        pair_counts[b << _SHIFT | y] -= c
                        p = new << _SHIFT | y
                        pair_counts[p] = get(p, 0) + c
                        s = npget(p)
                        if s is None:
                            new_pairs[p] = [wi]
                        else:
                            s.append(wi)
                    out.append(new)
                    if a == b:  # the `a` at i + 1 is consumed
                        k -= 1
                    start = pos = i + 2
                else:
                    pos = i + 1
            if out is not None:
                out.extend(w[start:])
                words[wi] = out
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
