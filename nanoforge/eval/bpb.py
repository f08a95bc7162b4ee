"""Validation bits per byte: a loss that does not depend on the tokenizer, so runs with different
vocabularies compare. nats summed over predicted tokens / (ln 2 × their UTF-8 bytes); special tokens
carry 0 bytes and are left out of both sums (as nanochat does).

    evaluate_bpb(model, "tokens/de4k", tokenizer.token_bytes, batch_size=8, seq_len=256, device="cpu")
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from nanoforge.errors import UserError


@torch.no_grad()
def evaluate_bpb(model: torch.nn.Module, tokens_dir: str | os.PathLike, token_bytes: Any, *, batch_size: int,
                 seq_len: int, device: str | torch.device, max_batches: int | None = None, layout: str = "packed",
                 rank: int = 0, world_size: int = 1, autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """One deterministic pass over the val split (at most `max_batches` batches per rank) -> dict(val_bpb,
    nats, bytes, tokens). Under torch.distributed the sums cover every rank's share of the split."""
    from nanoforge.data.loader import TokenLoader

    device = torch.device(device)
    tb = torch.as_tensor(np.asarray(token_bytes), dtype=torch.int64, device=device)
    loader = TokenLoader(tokens_dir, split="val", batch_size=batch_size, seq_len=seq_len, layout=layout,
                         rank=rank, world_size=world_size, device=str(device), infinite=False)
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nats, bytes, tokens
    try:
        for i, (inputs, targets, mask) in enumerate(loader):
            if max_batches is not None and max_batches > 0 and i >= max_batches:
                break
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                nats, scored = model(inputs, targets, mask, reduction="none")
            nbytes = tb[targets.clamp(min=0)] * scored.to(torch.int64)
            counted = nbytes > 0
            totals[0] += nats[counted].double().sum()
            totals[1] += nbytes.sum().double()
            totals[2] += counted.sum().double()
    finally:
        model.train(was_training)
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    nats, nbytes, ntokens = totals.tolist()
    if nbytes == 0:
        raise UserError(f"no scored bytes in the validation split of {tokens_dir}: is it empty?")
    return {"val_bpb": nats / (math.log(2) * nbytes), "nats": nats, "bytes": int(nbytes), "tokens": int(ntokens)}

