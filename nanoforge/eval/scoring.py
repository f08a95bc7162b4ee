"""Log-likelihood scoring with a shared-prefix KV cache: for one context and its N continuations the
context runs once, its keys/values are copied to N rows, and all continuations run as one batch.
Token handling follows lm-evaluation-harness (`_encode_pair`): trailing context spaces move to the
continuation, the whole text is encoded and split at the context's token length, BOS is prepended.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with BOS, continuation ids) exactly as lm-eval's causal `_encode_pair` makes them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    bos = tokenizer.bos_id is not None
    if not context:
        cont = tokenizer.encode(continuation)
        prefix = tokenizer.bos_id if bos else tokenizer.eos_id
        return ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
    whole = tokenizer.encode(context + continuation, bos=bos)
    ctx = tokenizer.encode(context, bos=bos)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def score_group(model: Any, context: Sequence[int], continuations: Sequence[Sequence[int]]
                ) -> list[tuple[float, bool]]:
    """(summed log-likelihood, is greedy) of each continuation after `context` (token ids)."""
    from nanoforge.model import KVCache

    param = next(model.parameters())
    device, limit = param.device, model.config.max_seq_len
    ctx = list(context)
    longest = max(len(c) for c in continuations)
    if len(ctx) + longest - 1 > limit:  # lm-eval truncates each sequence from the left: do the same
        return [_score_full(model, ctx, list(c)) for c in continuations]
    n = len(continuations)
    cache1 = KVCache(model.config, 1, len(ctx), device=device, dtype=param.dtype)
    h = model.hidden(torch.tensor([ctx], device=device), cache1)
    first = F.log_softmax(model.logits(h[:, -1]).float(), dim=-1)[0]  # predicts each continuation's 1st token
    results = []
    if longest > 1:
        cache = KVCache(model.config, n, len(ctx) + longest, device=device, dtype=param.dtype)
        cache.k[:, :, :, :len(ctx)] = cache1.k[:, :1, :, :len(ctx)]
        cache.v[:, :, :, :len(ctx)] = cache1.v[:, :1, :, :len(ctx)]
        cache.pos = len(ctx)
        rows = torch.zeros(n, longest - 1, dtype=torch.long, device=device)
        for i, c in enumerate(continuations):
            rows[i, :len(c) - 1] = torch.tensor(list(c[:-1]), dtype=torch.long)
        rest = F.log_softmax(model.logits(model.hidden(rows, cache)).float(), dim=-1)
    for i, c in enumerate(continuations):
        target = torch.tensor(list(c), device=device)
        logp = [first.unsqueeze(0)] + ([rest[i, :len(c) - 1]] if len(c) > 1 else [])
        lp = torch.cat(logp, dim=0)
        ll = lp.gather(1, target.unsqueeze(1)).sum()
        greedy = bool((lp.argmax(dim=-1) == target).all())
        results.append((float(ll), greedy))
    return results


def _score_full(model: Any, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    limit = model.config.max_seq_len
    inp = (ctx + cont)[-(limit + 1):][:-1]
    device = next(model.parameters()).device
    logits = model(torch.tensor([inp], device=device))[0, -len(cont):]
    lp = F.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(cont, device=device)
    return float(lp.gather(1, target.unsqueeze(1)).sum()), bool((lp.argmax(-1) == target).all())


@torch.no_grad()
def score_rolling(model: Any, tokens: Sequence[int], prefix_id: int) -> float:
    """Log-likelihood of a whole token sequence in max_seq_len windows (lm-eval's rolling rule)."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    limit = model.config.max_seq_len
    total = 0.0
    for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(
            token_list=list(tokens), prefix_token=prefix_id, max_seq_len=limit, context_len=1)):
        total += _score_full(model, list(ctx), list(pred))[0]
    return total
