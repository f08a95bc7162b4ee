"""Our own byte-level BPE trainer in Python (numpy for the counts and the merges that touch many places): the
readable reference and the oracle for the fast backends.

    counts = count_chunks(texts, pattern)            # regex pre-tokenization over 2 processes (pretokenize.py)
    merges = train_bpe(counts, num_merges)           # [(left_id, right_id), ...]; merge i makes id 256 + i

It produces exactly the merges rustbpe produces on the same input. rustbpe's rule (src/lib.rs,
`impl Ord for MergeJob`): take the pair with the highest count; among equal counts the *smallest* pair
(left id, then right id), because its max-heap orders ties by `other.pair.cmp(&self.pair)`. Counts are
kept exact incrementally, and a pair's occurrences are all created by one merge (every new pair contains
the new id), so a lazy queue whose stale entries are re-queued with the current count pops exactly that
pair (`_Queue`: one bucket per count, a heap only for the bucket being taken from).
"""

from __future__ import annotations

import gc
import heapq
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np

from nanoforge.pretokenize import count_chunks

__all__ = ["count_chunks", "merges_to_ranks", "train_bpe"]

_SEP, _DEL = -1, -2    # flat state: the slot between two words, a slot whose token was merged into its left


def _flat_state(chunk_counts: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                       dict[str, int], dict[str, np.ndarray]]:
    """Every chunk's UTF-8 bytes laid out in one array, `SEP w0 SEP w1 ... SEP`, one slot per byte:
    token ids `tok`, a doubly linked list over the live slots (`nxt`, `prv`), the word of every slot and the count
    of every word; then the count of every adjacent pair and, per pair, the slots of its left tokens (ascending).
    Pairs are keyed by the 2-character string of their ids. Counted with numpy: one stable sort of all pairs."""
    chunks = list(map(str.encode, chunk_counts))  # UTF-8; a chunk of one byte is a word without pairs
    n = len(chunks)
    lens = np.fromiter(map(len, chunks), dtype=np.int64, count=n)
    word_counts = np.fromiter(chunk_counts.values(), dtype=np.int64, count=n)
    size = int(lens.sum()) + n + 1
    tok = np.full(size, _SEP, dtype=np.int32)
    word = np.zeros(size, dtype=np.int32)
    nxt = np.arange(1, size + 1, dtype=np.int32)
    prv = np.arange(-1, size - 1, dtype=np.int32)
    inside = np.ones(size, dtype=bool)
    inside[0] = False
    inside[np.cumsum(lens + 1)] = False
    tok[inside] = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    word[inside] = np.repeat(np.arange(n, dtype=np.int32), lens)
    slots = np.flatnonzero(inside[:-1] & inside[1:])
    if not len(slots):
        return tok, nxt, prv, word, word_counts, {}, {}
    pairs = ((tok[slots] << 8) | tok[slots + 1]).astype(np.uint16)  # two bytes
    order = pairs.argsort(kind="stable")  # by pair, then by slot; 16-bit keys get a radix sort (~8x faster)
    pairs, slots = pairs[order], slots[order].astype(np.int32)
    starts = _group_starts(pairs)
    totals = np.add.reduceat(word_counts[word[slots]], starts)
    keys = [chr(p >> 8) + chr(p & 255) for p in pairs[starts].tolist()]
    return tok, nxt, prv, word, word_counts, dict(zip(keys, totals.tolist())), dict(zip(keys, _split(slots, starts)))


def _group_starts(keys: np.ndarray) -> np.ndarray:
    """Where each run of equal values in sorted `keys` starts."""
    first = np.empty(len(keys), dtype=bool)
    first[:1] = True
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    return first.nonzero()[0]


def _split(values: np.ndarray, starts: np.ndarray) -> list[np.ndarray]:
    cuts = starts.tolist()
    cuts.append(len(values))
    return [values[s:e] for s, e in zip(cuts, cuts[1:])]  # views; np.split is ~10x slower per piece


def _by_neighbour(neighbour: np.ndarray, count: np.ndarray, slot: np.ndarray, wide: bool
                  ) -> tuple[list[int], list[int], list[np.ndarray]]:
    """Distinct neighbours (ascending), the summed count of each and their slots (ascending). `wide`: some
    ids need more than 16 bits."""
    if not len(neighbour):
        return [], [], []
    # the method: np.argsort's wrapper costs more than tiny sorts; 16-bit keys get a radix sort
    order = (neighbour if wide else neighbour.astype(np.uint16)).argsort(kind="stable")
    neighbour, count, slot = neighbour[order], count[order], slot[order]
    starts = _group_starts(neighbour)
    return neighbour[starts].tolist(), np.add.reduceat(count, starts).tolist(), _split(slot, starts)


def _merge_slots(tok: np.ndarray, nxt: np.ndarray, prv: np.ndarray, word: np.ndarray, word_counts: np.ndarray,
                 slots: np.ndarray, a: int, b: int, new: int
                 ) -> tuple[tuple[list[int], list[int], list[np.ndarray]], tuple[list[int], list[int], list[np.ndarray]]]:
    """Merge every (a, b) whose left token sits in one of `slots` (ascending; stale ones are skipped) into `new`,
    in place. Returns the left neighbours x (with their counts and the slots of x) and the right neighbours y
    (with the slots of the new tokens), as `_by_neighbour` gives them."""
    right = nxt[slots]
    live = (tok[slots] == a) & (tok[right] == b)
    slots, right = slots[live], right[live]
    if a == b and len(slots) > 1:  # a run of a: BPE merges the leftmost pair, then the next non-overlapping one
        i = np.arange(len(slots))
        run = np.ones(len(slots), dtype=bool)
        run[1:] = slots[1:] != right[:-1]
        first = np.maximum.accumulate(np.where(run, i, 0))
        keep = (i - first) % 2 == 0
        slots, right = slots[keep], right[keep]
    xs, ys = prv[slots], nxt[right]
    x, y = tok[xs], tok[ys]
    # two occurrences side by side: the second's left neighbour is the first's new token (and the first's right
    # neighbour stays a, as the string path counts it: (b, a) -> (new, a) and (a, new) -> (new, new) cancel out)
    after = (xs[1:] == right[:-1]).nonzero()[0] + 1
    x[after] = new
    xs[after] = slots[after - 1]
    count = word_counts[word[slots]]
    tok[slots] = new
    tok[right] = _DEL
    nxt[slots] = ys
    prv[ys] = slots
    hx, hy = x >= 0, y >= 0  # not the word's edge
    wide = new >= 1 << 16
    return _by_neighbour(x[hx], count[hx], xs[hx], wide), _by_neighbour(y[hy], count[hy], slots[hy], wide)


def _words(tok: np.ndarray, sep: int) -> list[str]:
    """The live tokens of each word as a str (one character per token id); `sep` must not be a token id."""
    t = tok[tok != _DEL].astype(np.uint32)
    t[t == np.uint32(_SEP & 0xFFFFFFFF)] = sep
    return t[1:-1].tobytes().decode("utf-32-le", "surrogatepass").split(chr(sep))


def _merge_words(words: list[str], counts: list[int], holders: list[int], ab: str, new: str
                 ) -> tuple[Iterable[tuple[str, int, list[int]]], Iterable[tuple[str, int, list[int]]]]:
    """Merge every `ab` in the words listed in `holders` (stale and repeated ones are skipped) into `new`, in
    place. Returns the left neighbours x and the right neighbours y, each with its summed count and the words
    it occurs in (x before `new`, y after it)."""
    left_count: defaultdict[str, int] = defaultdict(int)
    left_words: defaultdict[str, list[int]] = defaultdict(list)
    right_count: defaultdict[str, int] = defaultdict(int)
    right_words: defaultdict[str, list[int]] = defaultdict(list)
    for wi in holders:
        pre, hit, post = words[wi].partition(ab)
        if not hit:  # no longer holds the pair (an earlier merge took one of its halves), or listed twice
            continue
        c = counts[wi]
        if ab not in post:  # one occurrence (the common case)
            if pre:
                x = pre[-1]
                left_count[x] += c
                left_words[x].append(wi)
            if post:
                y = post[0]
                right_count[y] += c
                right_words[y].append(wi)
            words[wi] = f"{pre}{new}{post}"
            continue
        w = words[wi]
        n = len(w)
        i = len(pre)
        prev_end = -1
        while i >= 0:
            if i:  # two adjacent occurrences: the left neighbour is the new token itself
                x = new if i == prev_end else w[i - 1]
                left_count[x] += c
                left_words[x].append(wi)
            j = i + 2
            if j < n:
                y = w[j]
                right_count[y] += c
                right_words[y].append(wi)
            prev_end = j
            i = w.find(ab, j)
        words[wi] = w.replace(ab, new)
    # the count and word dicts got their keys in the same order
    return (zip(left_count, left_count.values(), left_words.values()),
            zip(right_count, right_count.values(), right_words.values()))


class _Queue:
    """The pairs by count, highest first, ties by the smallest pair (left id, then right id): rustbpe's order.
    One bucket per count; only the bucket being taken from is a heap (of 2-character pair strings, which compare
    like (left, right)), the others are plain lists until their turn. The highest count never rises (a merge
    only lowers counts, and a new pair counts at most as often as the merged one), so every push goes into the
    current bucket or a lower one."""

    def __init__(self, pair_counts: dict[str, int]) -> None:
        self.buckets: dict[int, list[str]] = {}
        self.top = 0  # the count of the bucket being taken from
        self.current: list[str] = []
        for p, c in pair_counts.items():
            if c > 0:
                self.add(p, c)
        self.levels = [-c for c in self.buckets]
        heapq.heapify(self.levels)

    def add(self, pair: str, count: int) -> None:
        if count == self.top:
            heapq.heappush(self.current, pair)
        elif (bucket := self.buckets.get(count)) is not None:
            bucket.append(pair)
        else:
            self.buckets[count] = [pair]
            if self.top:
                heapq.heappush(self.levels, -count)

    def pop(self) -> tuple[str, int] | None:
        """The first pair and the count it was queued with (stale if the pair's count has dropped since)."""
        while not self.current:
            if not self.levels:
                return None
            self.top = -heapq.heappop(self.levels)
            self.current = self.buckets.pop(self.top)
            heapq.heapify(self.current)
        return heapq.heappop(self.current), self.top


def train_bpe(chunk_counts: dict[str, int], num_merges: int, *, vector_min: float = 32) -> list[tuple[int, int]]:
    """The first `num_merges` merges (fewer when no pair is left) of byte-level BPE on these chunk counts.

    A merge is applied in one of two ways that give the same counts. While merges touch many places (a moving
    average of at least `vector_min` candidate slots per merge), numpy on the flat state of `_flat_state`: ~40
    array operations over the pair's occurrences. After that, on the words as str with one character per token
    (chr(id)), where finding a pair and rewriting a word are `str.partition` in C (`str.find` and `str.replace`
    for a word that holds it twice: leftmost, non-overlapping, BPE's own order, also for runs of a == b): a few
    dictionary operations per occurrence.
    A pair is the 2-character string of its ids. Per merge, the pair-count changes are summed per neighbour
    token and applied once per distinct neighbour. `vector_min=0` keeps numpy throughout, `float("inf")` goes
    to strings at once."""
    # The merge loop makes ~10^5 lists that live to the end (the holders of every new pair) and no cycles:
    # the cyclic garbage collector would walk them over and over (~10% of the time).
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _train_bpe(chunk_counts, num_merges, vector_min)
    finally:
        if enabled:
            gc.enable()


def _train_bpe(chunk_counts: dict[str, int], num_merges: int, vector_min: float) -> list[tuple[int, int]]:
    tok, nxt, prv, word, word_counts, counts0, where = _flat_state(chunk_counts)
    pair_counts: defaultdict[str, int] = defaultdict(int, counts0)
    holders_of: dict[str, Any] = where  # slot arrays from the flat state, word-index lists from the string path
    queue = _Queue(pair_counts)
    add = queue.add
    merges: list[tuple[int, int]] = []
    words: list[str] | None = None
    counts: list[int] = []
    slot_pairs = np.empty(0, dtype=np.int64)
    average = -1.0
    while len(merges) < num_merges:
        entry = queue.pop()
        if entry is None:
            break
        ab, queued = entry
        current = pair_counts[ab]
        if current != queued:  # stale entry: re-queue with the current count
            if current > 0:
                add(ab, current)
            continue
        A, B = ab
        a, b = ord(A), ord(B)
        new = 256 + len(merges)
        N = chr(new)
        merges.append((a, b))
        holders = holders_of.pop(ab)
        pair_counts[ab] = 0  # every occurrence is merged (for a == b, runs leave no (a, a) behind)
        if words is None:
            average = len(holders) if average < 0 else 0.9 * average + 0.1 * len(holders)
            if average < vector_min:
                words, counts = _words(tok, 256 + num_merges), word_counts.tolist()
                # The pair at every slot (left << 32 | right), frozen from now on: most slots the flat state
                # lists for a pair lost it before the switch, and a slot never holds its pair again.
                right_tok = tok[np.minimum(nxt, len(tok) - 1)].astype(np.int64)  # the last slot (a SEP) has none
                slot_pairs = tok.astype(np.int64) << 32 | right_tok & 0xFFFFFFFF
        if words is None:
            (lx, lc, ls), (ry, rc, rs) = _merge_slots(tok, nxt, prv, word, word_counts, holders, a, b, new)
            left, right = zip(map(chr, lx), lc, ls), zip(map(chr, ry), rc, rs)
        else:
            if type(holders) is not list:  # slots from the flat state -> their words
                if len(holders) > 16:  # drop the slots that lost the pair (cheaper in numpy than as visits)
                    holders = holders[slot_pairs[holders] == a << 32 | b]
                holders = word[holders].tolist()
            left, right = _merge_words(words, counts, holders, ab, N)
        # Every new pair holds the new token, so this merge makes all of its occurrences: its holders are
        # complete, and its count is final until one of its halves is merged away. (x, a) -> (x, new) is new
        # and final after the left neighbours; (new, y) also loses (new, a) from a left neighbour x == new.
        for x, c, hs in left:
            XN = x + N
            pair_counts[x + A] -= c
            pair_counts[XN] = c
            holders_of[XN] = hs
            add(XN, c)
        for y, c, hs in right:
            NY = N + y
            pair_counts[B + y] -= c
            c = pair_counts[NY] = pair_counts.get(NY, 0) + c
            if c > 0:
                holders_of[NY] = hs
                add(NY, c)
    return merges


def merges_to_ranks(merges: list[tuple[int, int]]) -> dict[bytes, int]:
    """tiktoken ranks: the 256 bytes, then each merge's bytes with rank 256 + its index."""
    token_bytes = [bytes([i]) for i in range(256)]
    for a, b in merges:
        token_bytes.append(token_bytes[a] + token_bytes[b])
    return {t: i for i, t in enumerate(token_bytes)}
