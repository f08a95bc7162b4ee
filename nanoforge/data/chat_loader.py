"""ChatLoader: training rows of rendered conversations, packed best-fit, for rank r of a world of w.

    loader = ChatLoader(rendered, batch_size=8, seq_len=256, pad_id=tok.bos_id, seed=0)
    for inputs, targets, mask in loader: ...      # targets are -1 and mask False where nothing is learned
    state = loader.state_dict()                   # JSON-serialisable; load_state_dict() resumes exactly

`rendered` is a list of (ids, mask) pairs, each at most seq_len + 1 tokens long (the caller truncates a
longer conversation at render time, so no row ever holds a cut conversation that would have fit). A row
is seq_len + 1 tokens: inputs = row[:-1], targets = row[1:], target t is learned where mask[t + 1] = 1.
Rows are filled from a buffer of `buffer_size` conversations: repeatedly the largest one that fits the
space left, until none fits; the rest of the row is padding (nanochat's SFT loader). Conversations are
never split across rows.

Order: every epoch a permutation of all conversations from (seed, epoch); rank r takes items r, r+w, ...
of it. `infinite=False` makes one pass in the given order (validation): every rank yields the same
number of batches, all-padding rows where its share runs out, so collective ops never hang.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from nanoforge.errors import UserError

STATE_VERSION = 1


def pack_rows(lengths: Sequence[int], row_len: int, buffer_size: int) -> list[list[int]]:
    """Best-fit packing of items (by index, in the given order) into rows of `row_len` tokens through a
    buffer of `buffer_size` items: the largest buffered item that fits the space left goes next (the
    earliest of equal ones); a row closes when nothing in the buffer fits. Items longer than a row are
    refused (the caller truncates them first)."""
    rows: list[list[int]] = []
    stream = iter(range(len(lengths)))
    buffer: list[int] = []
    while (row := _fill_row(buffer, stream, lengths, row_len, buffer_size)) is not None:
        rows.append(row)
    return rows


def _fill_row(buffer: list[int], stream: Iterator[int], lengths: Sequence[int], row_len: int,
              buffer_size: int) -> list[int] | None:
    """Take items for one row out of `buffer` (topped up from `stream`); None when both are empty."""
    row: list[int] = []
    space = row_len
    while True:
        while len(buffer) < buffer_size:
            nxt = next(stream, None)
            if nxt is None:
                break
            if lengths[nxt] > row_len:
                raise UserError(f"conversation {nxt} has {lengths[nxt]} tokens, more than a row of {row_len}")
            buffer.append(nxt)
        best, best_len = -1, 0
        for j, item in enumerate(buffer):
            n = lengths[item]
            if best_len < n <= space:
                best, best_len = j, n
        if best < 0:
            return row or None
        row.append(buffer.pop(best))
        space -= best_len
        if space == 0:
            return row


class ChatLoader:
    def __init__(self, rendered: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int, seq_len: int,
                 pad_id: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device: str | torch.device = "cpu", infinite: bool = True, buffer_size: int = 100) -> None:
        """Refuses (UserError) an empty list, a conversation longer than seq_len + 1 tokens, a rank outside
        the world and a buffer smaller than 1."""
        if not rendered:
            raise UserError("no conversations to train on")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside a world of {world_size}")
        if batch_size < 1 or seq_len < 1 or buffer_size < 1:
            raise UserError(f"batch_size, seq_len and buffer_size must be positive, got {batch_size}, {seq_len}, "
                            f"{buffer_size}")
        self.row_len = seq_len + 1
        self.ids = [np.asarray(ids, dtype=np.int64) for ids, _ in rendered]
        self.masks = [np.asarray(mask, dtype=bool) for _, mask in rendered]
        self.lengths = [len(a) for a in self.ids]
        too_long = [i for i, n in enumerate(self.lengths) if n > self.row_len]
        if too_long:
            raise UserError(f"conversation {too_long[0]} has {self.lengths[too_long[0]]} tokens, more than a row "
                            f"of seq_len + 1 = {self.row_len}: truncate it when rendering")
        self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id
        self.rank, self.world_size, self.seed, self.infinite = rank, world_size, seed, infinite
        self.buffer_size = buffer_size
        self.device = torch.device(device)
        self.epoch = 0
        self.pos = 0              # items of this rank's share of the epoch already moved into the buffer
        self.buffer: list[int] = []
        self.step = 0
        self._share_epoch = -1
        self._share: list[int] = []

    def __len__(self) -> int:
        """Batches in one pass (infinite=False): the most any rank needs, so all ranks agree."""
        counts = []
        for r in range(self.world_size):
            order = self._order(0)[r::self.world_size]
            rows = len(pack_rows([self.lengths[i] for i in order], self.row_len, self.buffer_size))
            counts.append(-(-rows // self.batch_size))
        return max(counts)

    # --- order -------------------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[int]:
        if not self.infinite:
            return list(range(len(self.ids)))
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(len(self.ids)).tolist()

    def _share_of(self, epoch: int) -> list[int]:
        if self._share_epoch != epoch:
            self._share = self._order(epoch)[self.rank::self.world_size]
            self._share_epoch = epoch
        return self._share

    def _stream(self) -> Iterator[int]:
        """This rank's conversations from the current position on (across epochs when infinite)."""
        while True:
            share = self._share_of(self.epoch)
            while self.pos < len(share):
                self.pos += 1
                yield share[self.pos - 1]
            if not self.infinite or not share:
                return
            self.epoch += 1
            self.pos = 0

    # --- batches -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        batches = len(self) if not self.infinite else None
        while batches is None or self.step < batches:
            yield self._batch()

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L = self.batch_size, self.row_len
        tokens = np.full((B, L), self.pad_id, dtype=np.int64)
        learn = np.zeros((B, L), dtype=bool)
        stream = self._stream()
        for b in range(B):
            row = _fill_row(self.buffer, stream, self.lengths, L, self.buffer_size) or []
            at = 0
            for item in row:
                n = self.lengths[item]
                tokens[b, at:at + n] = self.ids[item]
                learn[b, at:at + n] = self.masks[item]
                at += n
        self.step += 1
        x = torch.from_numpy(tokens[:, :-1].copy())
        mask = torch.from_numpy(learn[:, 1:].copy())
        y = torch.from_numpy(tokens[:, 1:].copy()).masked_fill_(~mask, -1)
        if self.device.type != "cpu":
            x, y, mask = (t.pin_memory().to(self.device, non_blocking=True) for t in (x, y, mask))
        return x, y, mask

    # --- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "epoch": self.epoch, "pos": self.pos, "buffer": list(self.buffer),
                "step": self.step, "conversations": len(self.ids), "tokens": int(sum(self.lengths)),
                "rank": self.rank, "world_size": self.world_size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken; UserError when it belongs to other data or another
        rank layout."""
        if state.get("version") != STATE_VERSION:
            raise UserError(f"chat loader state version {state.get('version')} is not {STATE_VERSION}")
        mine = {"conversations": len(self.ids), "tokens": int(sum(self.lengths)), "rank": self.rank,
                "world_size": self.world_size, "seed": self.seed}
        diff = [f"{k} {state.get(k)} -> {v}" for k, v in mine.items() if state.get(k) != v]
        if diff:
            raise UserError(f"cannot resume: the chat data or process layout changed ({', '.join(diff)}); "
                            f"resume with the data the checkpoint was trained on")
        self.epoch, self.pos, self.step = int(state["epoch"]), int(state["pos"]), int(state["step"])
        self.buffer = [int(i) for i in state["buffer"]]
