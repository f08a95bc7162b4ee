"""TokenLoader: batches of `(inputs, targets, mask)` from token shards, for rank r of a world of w.

    loader = TokenLoader("de32k", "train", batch_size=8, seq_len=512, layout="bos_aligned",
                         rank=rank, world_size=world, seed=0, device="cuda")
    for step, (x, y, mask) in zip(range(steps), loader): ...
    checkpoint["loader"] = loader.state_dict()      # JSON-serialisable; load_state_dict() resumes exactly

Layouts (each row is T+1 consecutive tokens; inputs = row[:-1], targets = row[1:]):
- packed: the split's stream (BOS-separated documents) cut into windows of T+1 tokens overlapping by one,
  so every token is a target exactly once per epoch; windows are shuffled per epoch. mask None.
- bos_aligned: every row starts at a document start. Rows are filled best-fit from a buffer of documents
  (the largest document that fits the remaining space); only when none fits is the shortest cropped to fill
  the row, as nanochat's loader does. `cropped_fraction` reports the share of tokens thrown away. mask None.
- unpacked: one document per row, truncated to T+1 tokens or padded; mask False on padding.

Data order is a function of (seed, epoch) only, so every rank computes the same permutation and takes a
disjoint part of it (rank r of w: items r, r+w, ...; packed: the r-th block of B windows of each global
batch). `infinite=True` cycles over epochs (the epoch is in the state); `infinite=False` makes one pass in
file order for validation: every rank yields the same number of batches, padding rows (mask False) where
its data runs out, so collective ops never hang, and every token is scored exactly once over all ranks.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from nanoforge.data import shards
from nanoforge.errors import UserError

LAYOUTS = ("packed", "bos_aligned", "unpacked")
STATE_VERSION = 1


class TokenLoader:
    def __init__(self, tokens_dir: str | os.PathLike, split: str = "train", batch_size: int = 8,
                 seq_len: int = 512, layout: str = "packed", rank: int = 0, world_size: int = 1, seed: int = 0,
                 device: str | torch.device = "cpu", infinite: bool = True, buffer_size: int = 1000,
                 tokenizer_fingerprint: str | None = None) -> None:
        """Refuses (UserError) an unknown layout or split, a rank outside the world, an unfinished or
        corrupt token folder, shards of another tokenizer (when `tokenizer_fingerprint` is given) and a
        split too small for one batch."""
        if layout not in LAYOUTS:
            raise UserError(f"unknown data layout {layout!r} (choose from {', '.join(LAYOUTS)})")
        if split not in shards.SPLITS:
            raise UserError(f"unknown split {split!r} (choose from {', '.join(shards.SPLITS)})")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside a world of {world_size}")
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        self.meta = shards.read_meta(tokens_dir, tokenizer_fingerprint)
        self.tokenizer_fingerprint: str = self.meta["tokenizer_fingerprint"]
        self.path = self.meta["path"]
        self.split, self.layout, self.seed, self.infinite = split, layout, seed, infinite
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.device = torch.device(device)
        self.buffer_size = buffer_size
        self.bos_id = int(self.meta["bos_id"])
        self._pin = self.device.type == "cuda"

        paths = shards.shard_paths(self.path, split)
        self._shards = [shards.open_shard(p) for p in paths]
        self._bounds = np.cumsum([0] + [len(s) for s in self._shards])
        self.total_tokens = int(self._bounds[-1])
        if self.total_tokens < 2:
            raise UserError(f"token folder {self.path} has no {split} tokens "
                            f"(tokenize with --val-docs or --val-fraction to get a validation split)")
        if self.total_tokens != self.meta["splits"][split]["tokens"]:
            raise UserError(f"token folder {self.path}: {split} shards hold {self.total_tokens:,} tokens but "
                            f"meta.json says {self.meta['splits'][split]['tokens']:,} (shards missing or replaced)")
        if layout != "packed":
            starts = shards.document_starts(self.path, split, self.bos_id)
            self._doc_start = starts
            self._doc_len = np.diff(np.append(starts, self.total_tokens))
        self.epoch = 0
        self.step = 0
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None
        # bos_aligned state
        self._pos = 0
        self._buffer: list[tuple[int, int, int]] = []  # (length, seq, doc), sorted
        self._next_seq = 0
        self._cropped = 0
        self._consumed = 0
        self._setup()

    # ---- geometry -------------------------------------------------------------------------------------
    def _setup(self) -> None:
        B, T, w = self.batch_size, self.seq_len, self.world_size
        if self.layout == "packed":
            n = (self.total_tokens - 1) // T if self.infinite else math.ceil((self.total_tokens - 1) / T)
            self._n_items = n
            if self.infinite:
                self._steps = n // (B * w)
                if self._steps == 0:
                    raise UserError(f"{self.split} split of {self.path} has {self.total_tokens:,} tokens: "
                                    f"too few for one batch of {w}x{B} rows of {T + 1} tokens")
            else:
                self._steps = math.ceil(n / (B * w))
        else:
            n_docs = len(self._doc_start)
            self._n_items = n_docs
            if self.infinite and n_docs // w == 0 or (self.layout == "unpacked" and self.infinite
                                                        and n_docs // w // B == 0):
                raise UserError(f"{self.split} split of {self.path} has {n_docs:,} documents: too few for "
                                f"{w} rank(s) x {B} rows")
            if self.layout == "unpacked":
                self._steps = n_docs // w // B if self.infinite else math.ceil(math.ceil(n_docs / w) / B)
            elif not self.infinite:
                plans = [self._plan_rows(np.arange(r, n_docs, w)) for r in range(w)]  # every rank's count
                self._rows, self._cropped, self._consumed = plans[self.rank]
                self._steps = max(math.ceil(len(p[0]) / B) for p in plans)

    def __len__(self) -> int:
        """Batches per epoch (for `infinite=False`: in the whole pass). Unknown for infinite bos_aligned."""
        if self.layout == "bos_aligned" and self.infinite:
            raise TypeError("an infinite bos_aligned loader has no fixed number of batches per epoch")
        return self._steps

    @property
    def cropped_fraction(self) -> float:
        """bos_aligned: the fraction of tokens taken from documents that were cropped away (0 otherwise)."""
        return self._cropped / self._consumed if self._consumed else 0.0

    def _order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of windows (packed) or documents, the same on every rank."""
        if self._perm_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            dtype = np.int32 if self._n_items < 2**31 else np.int64
            self._perm = rng.permutation(self._n_items).astype(dtype, copy=False)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    # ---- reading --------------------------------------------------------------------------------------
    def _copy(self, a: int, b: int, out: np.ndarray) -> None:
        """Tokens [a, b) of the split's stream into `out` (len b - a), across shard boundaries."""
        i = int(np.searchsorted(self._bounds, a, side="right")) - 1
        done = 0
        while a < b:
            lo = a - int(self._bounds[i])
            n = min(b - a, len(self._shards[i]) - lo)
            out[done:done + n] = self._shards[i][lo:lo + n]
            done += n
            a += n
            i += 1

    # ---- iteration ------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if not self.infinite and self.step >= self._steps:
            raise StopIteration
        if self.infinite and self.layout != "bos_aligned" and self.step >= self._steps:
            self.epoch += 1
            self.step = 0
        rows = np.full((self.batch_size, self.seq_len + 1), self.bos_id, dtype=np.int64)
        lengths = getattr(self, f"_batch_{self.layout}")(rows)
        self.step += 1
        mask = None
        if lengths is not None:
            mask = np.arange(self.seq_len)[None, :] < (lengths[:, None] - 1)
        return self._to_device(rows, mask)

    def _batch_packed(self, rows: np.ndarray) -> np.ndarray | None:
        B, T, w = self.batch_size, self.seq_len, self.world_size
        first = (self.step * w + self.rank) * B
        if self.infinite:
            windows = self._order(self.epoch)[first:first + B]
        else:
            windows = np.arange(first, first + B)
        lengths = np.zeros(B, dtype=np.int64)
        for i, j in enumerate(windows.tolist()):
            if j >= self._n_items:
                continue
            a = j * T
            b = min(a + T + 1, self.total_tokens)
            self._copy(a, b, rows[i, :b - a])
            lengths[i] = b - a
        return None if self.infinite or (lengths == T + 1).all() else lengths

    def _batch_unpacked(self, rows: np.ndarray) -> np.ndarray:
        B, T, w = self.batch_size, self.seq_len, self.world_size
        if self.infinite:
            docs = self._order(self.epoch)[self.rank::w][self.step * B:(self.step + 1) * B]
        else:
            docs = np.arange(self.rank, self._n_items, w)[self.step * B:(self.step + 1) * B]
        lengths = np.zeros(B, dtype=np.int64)
        for i, d in enumerate(docs.tolist()):
            n = min(int(self._doc_len[d]), T + 1)
            a = int(self._doc_start[d])
            self._copy(a, a + n, rows[i, :n])
            lengths[i] = n
        return lengths

    def _batch_bos_aligned(self, rows: np.ndarray) -> np.ndarray | None:
        B = self.batch_size
        if not self.infinite:
            lengths = np.zeros(B, dtype=np.int64)
            for i, segments in enumerate(self._rows[self.step * B:(self.step + 1) * B]):
                lengths[i] = self._fill(rows[i], segments)
            return None if (lengths == self.seq_len + 1).all() else lengths
        for i in range(B):
            self._fill(rows[i], self._next_row())
        return None

    def _fill(self, row: np.ndarray, segments: list[tuple[int, int]]) -> int:
        pos = 0
        for doc, n in segments:
            a = int(self._doc_start[doc])
            self._copy(a, a + n, row[pos:pos + n])
            pos += n
        return pos

    def _next_doc(self) -> int:
        order = self._order(self.epoch)
        mine = len(order) // self.world_size  # equal share per rank; the remainder waits for a later epoch
        if self._pos >= mine:
            self.epoch += 1
            self._pos = 0
            order = self._order(self.epoch)
        doc = int(order[self._pos * self.world_size + self.rank])
        self._pos += 1
        return doc

    def _next_row(self) -> list[tuple[int, int]]:
        """Best fit: the largest buffered document that fits the space left (the earliest among equals);
        when none fits, the shortest document is cropped to fill the row."""
        cap, segments = self.seq_len + 1, []
        buf = self._buffer
        while cap > 0:
            while len(buf) < self.buffer_size:
                doc = self._next_doc()
                bisect.insort(buf, (int(self._doc_len[doc]), self._next_seq, doc))
                self._next_seq += 1
            k = bisect.bisect_right(buf, (cap, math.inf)) - 1
            if k >= 0:
                k = bisect.bisect_left(buf, (buf[k][0], -1))
                n, _, doc = buf.pop(k)
            else:
                length, _, doc = buf.pop(0)
                n = cap
                self._cropped += length - n
            self._consumed += int(self._doc_len[doc])
            segments.append((doc, n))
            cap -= n
        return segments

    def _plan_rows(self, docs: np.ndarray) -> tuple[list[list[tuple[int, int]]], int, int]:
        """One pass of best-fit packing over `docs` (in order) for validation: like `_next_row`, but a row
        that nothing fits into is closed with padding; only documents longer than a row are cropped.
        Also returns the tokens cropped and consumed."""
        lens = self._doc_len
        cropped = consumed = 0
        buf: list[tuple[int, int, int]] = []
        rows, it = [], iter(docs.tolist())
        exhausted = False
        while True:
            cap, segments = self.seq_len + 1, []
            while cap > 0:
                while not exhausted and len(buf) < self.buffer_size:
                    d = next(it, None)
                    if d is None:
                        exhausted = True
                    else:
                        bisect.insort(buf, (int(lens[d]), d, d))
                if not buf:
                    break
                k = bisect.bisect_right(buf, (cap, math.inf)) - 1
                if k >= 0:
                    k = bisect.bisect_left(buf, (buf[k][0], -1))
                    n, _, d = buf.pop(k)
                elif segments:
                    break  # pad rather than crop: validation should score every token it can
                else:
                    _, _, d = buf.pop(0)
                    n = cap
                    cropped += int(lens[d]) - n
                consumed += int(lens[d])
                segments.append((d, n))
                cap -= n
            if segments:
                rows.append(segments)
            if not buf and exhausted:
                return rows, cropped, consumed

    def _to_device(self, rows: np.ndarray, mask: np.ndarray | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        x = torch.from_numpy(np.ascontiguousarray(rows[:, :-1]))
        y = torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))
        m = None if mask is None else torch.from_numpy(mask)
        if self.device.type == "cpu":
            return x, y, m
        if self._pin:
            x, y = x.pin_memory(), y.pin_memory()
            m = None if m is None else m.pin_memory()
        nb = self._pin
        return (x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb),
                None if m is None else m.to(self.device, non_blocking=nb))

    # ---- state ----------------------------------------------------------------------------------------
    _KEYS = ("layout", "split", "seed", "world_size", "batch_size", "seq_len", "infinite")

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands (JSON-serialisable). packed/unpacked state is the same on every rank;
        bos_aligned state holds the rank's document buffer, so save one per rank."""
        state: dict[str, Any] = {"version": STATE_VERSION, "tokenizer_fingerprint": self.tokenizer_fingerprint,
                                 **{k: getattr(self, k) for k in self._KEYS},
                                 "rank": self.rank, "epoch": self.epoch, "step": self.step}
        if self.layout == "bos_aligned":
            state.update(pos=self._pos, buffer=[[s, d] for _, s, d in sorted(self._buffer, key=lambda e: e[1])],
                         next_seq=self._next_seq, cropped=self._cropped, consumed=self._consumed)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken. Refuses a state from another layout, split, seed,
        geometry, world size or tokenizer (and for bos_aligned, another rank)."""
        if state.get("version") != STATE_VERSION:
            raise UserError(f"data loader state has version {state.get('version')}, expected {STATE_VERSION}")
        keys = list(self._KEYS) + ["tokenizer_fingerprint"] + (["rank"] if self.layout == "bos_aligned" else [])
        for k in keys:
            if state.get(k) != getattr(self, k):
                raise UserError(f"data loader state was saved with {k}={state.get(k)!r}, but this loader has "
                                f"{k}={getattr(self, k)!r}: resume with the same data settings")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        if self.layout == "bos_aligned":
            self._pos, self._next_seq = int(state["pos"]), int(state["next_seq"])
            self._cropped, self._consumed = int(state["cropped"]), int(state["consumed"])
            self._buffer = sorted((int(self._doc_len[d]), int(s), int(d)) for s, d in state["buffer"])
