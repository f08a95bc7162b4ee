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
