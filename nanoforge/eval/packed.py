"""Batched multiple-choice scoring with shared prefixes: each question becomes ONE row holding its context
once, followed by every choice's tokens; an attention mask lets a choice see the context and itself only,
and RoPE positions restart after the context for each choice. Many questions go into one forward
(sorted by length, padded), so the context runs once per question and the matrix multiplies are large.

    lls = score_packed(model, [(context_ids, [choice_ids, ...]), ...])   # summed log-likelihoods

Same numbers as one forward per (context, choice) pair (lm-eval's way) up to float rounding. Questions
longer than the model's window fall back to lm-eval's left-truncated per-pair scoring.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

Request = tuple[Sequence[int], Sequence[Sequence[int]]]


def _packed_row(ctx: Sequence[int], conts: Sequence[Sequence[int]]
                ) -> tuple[list[int], list[int], list[int], list[tuple[list[int], list[int]]]]:
    """(tokens, positions, segment per token (0 = context, j+1 = choice j), per choice (indices of the
    predicting positions, target ids))."""
    n = len(ctx)
    tokens, pos, seg = list(ctx), list(range(n)), [0] * n
    where = []
    for j, c in enumerate(conts):
        start = len(tokens)
        body = list(c[:-1])
        tokens += body
        pos += range(n, n + len(body))
        seg += [j + 1] * len(body)
        # an empty continuation scores 0 (nothing predicted), as in lm-eval
        where.append(([n - 1] + list(range(start, start + len(body))), list(c)) if len(c) else ([], []))
    return tokens, pos, seg, where


def _forward(model: Any, tokens: torch.Tensor, pos: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states of packed rows: the model's own layers with a segment-aware causal mask."""
    from nanoforge.model.llama import apply_rope

    B, T = tokens.shape
    idx = torch.arange(T, device=tokens.device)
    causal = idx[None, :, None] >= idx[None, None, :]                      # [1, T(q), T(k)]
    same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])    # key is context, or my choice
    mask = (causal & same & (seg[:, None, :] >= 0)) | torch.eye(T, dtype=torch.bool, device=tokens.device)
    mask = mask[:, None]                                                     # [B, 1, T, T]
    model._rope(0, int(pos.max()) + 1)  # extends the tables if needed
    cos, sin = model.rope_cos[pos][:, None], model.rope_sin[pos][:, None]   # [B, 1, T, D]
    x = model.tok_embeddings(tokens)
    for layer in model.layers:
        a = layer.attention
        h = layer.attention_norm(x)
        q = a.wq(h).view(B, T, a.n_heads, a.head_dim).transpose(1, 2)
        k = a.wk(h).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        v = a.wv(h).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=a.n_kv_heads != a.n_heads)
        x = x + a.wo(y.transpose(1, 2).reshape(B, T, a.n_heads * a.head_dim))
        x = x + layer.feed_forward(layer.ffn_norm(x))
    return model.norm(x)


@torch.no_grad()
def score_packed(model: Any, requests: Sequence[Request], *, max_batch_tokens: int = 8192
                 ) -> list[list[tuple[float, bool]]]:
    """For each (context ids, [continuation ids...]): [(summed log-likelihood, is greedy), ...] per
    continuation. Rows are sorted by length and batched up to `max_batch_tokens` padded tokens."""
    from nanoforge.eval.scoring import _score_full

    device = next(model.parameters()).device
    limit = model.config.max_seq_len
    out: list[list[tuple[float, bool]] | None] = [None] * len(requests)
    rows = []
    for i, (ctx, conts) in enumerate(requests):
        if not any(len(c) for c in conts):  # nothing to predict
            out[i] = [(0.0, True) for _ in conts]
            continue
        if len(ctx) + max(len(c) for c in conts) - 1 > limit:  # lm-eval truncates from the left: do the same
            out[i] = [_score_full(model, list(ctx), list(c)) if len(c) else (0.0, True) for c in conts]
            continue
        rows.append((i, *_packed_row(ctx, conts)))
    rows.sort(key=lambda r: -len(r[1]))
    start = 0
    while start < len(rows):
        T = len(rows[start][1])
        end = start + max(1, max_batch_tokens // T)
        batch = rows[start:end]
        start = end
        tok = torch.zeros(len(batch), T, dtype=torch.long)
        pos = torch.zeros(len(batch), T, dtype=torch.long)
        seg = torch.full((len(batch), T), -1, dtype=torch.long)
        for b, (_, t, p, s, _) in enumerate(batch):
            tok[b, :len(t)], pos[b, :len(t)], seg[b, :len(t)] = torch.tensor(t), torch.tensor(p), torch.tensor(s)
        h = _forward(model, tok.to(device), pos.to(device), seg.to(device))
        # logits only where a continuation token is predicted
        sel_b, sel_t, targets, owner = [], [], [], []
        for b, (i, _, _, _, where) in enumerate(batch):
            for j, (positions, target) in enumerate(where):
                sel_b += [b] * len(positions)
                sel_t += positions
                targets += target
                owner += [(i, j)] * len(positions)
        sel = (torch.tensor(sel_b, dtype=torch.long), torch.tensor(sel_t, dtype=torch.long))
        logp = F.log_softmax(model.logits(h[sel]).float(), dim=-1)
        tgt = torch.tensor(targets, dtype=torch.long, device=device)
        lls = logp.gather(1, tgt[:, None])[:, 0].tolist()
        hits = (logp.argmax(-1) == tgt).tolist()
        acc: dict[tuple[int, int], list[Any]] = {}
        for key, ll, hit in zip(owner, lls, hits):
            s = acc.setdefault(key, [0.0, True])
            s[0] += ll
            s[1] = s[1] and hit
        for i, _, _, _, where in batch:
            out[i] = [(float(s[0]), bool(s[1])) for s in (acc.get((i, j), (0.0, True)) for j in range(len(where)))]
    return out  # type: ignore[return-value]
