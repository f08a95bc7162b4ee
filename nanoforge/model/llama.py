"""The LLaMA-style decoder: RMSNorm, rotary embeddings (rotate-half, as Hugging Face Llama), SwiGLU,
grouped-query attention through F.scaled_dot_product_attention, no biases, optional tied embeddings.

Parameter names map one-to-one onto Hugging Face `LlamaForCausalLM` (see nanoforge/export/hf.py):
tok_embeddings ↔ model.embed_tokens, layers.i.attention.wq ↔ model.layers.i.self_attn.q_proj, ...,
feed_forward.w1/w3/w2 ↔ mlp.gate_proj/up_proj/down_proj, norm ↔ model.norm, output ↔ lm_head.

    model = LLaMA(preset_model("cpu-demo"))
    loss = model(inputs, targets)           # mean over scored positions
    logits = model(inputs)                  # [B, T, V] float32
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanoforge.model.config import ModelConfig
from nanoforge.model.gemm import Linear, add_mm_tn_, linear, mm_nn, mm_nt


class RMSNorm(nn.Module):
    """weight × x / rms(x); the mean of squares is reduced in float32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Like HF Llama: normalise in fp32, cast back, then scale by the weight.
        y = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)
        return self.weight.to(x.dtype) * y


def rope_cache(head_dim: int, seq_len: int, theta: float, device: torch.device | str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [seq_len, head_dim] (the frequencies repeated twice: the rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    t = torch.arange(seq_len, dtype=torch.int64, device=device).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [T, D] (or [B, 1, T, D]: a position per row). x·cos + rotate_half(x)·sin with rotate_half = (-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)  # fp32 tables: under autocast q/k come back in bf16


class KVCache:
    """Keys and values of every layer for incremental decoding: k, v [L, B, n_kv_heads, max_len, head_dim].

    Two ways to use it. All rows at one length: `pos` is the number of positions already filled and the
    model advances it after the last layer. Rows at their own lengths (the inference engine, where rows
    join and leave): `bind(rows, starts, kv_len)` before each forward says which cache rows the batch
    uses and where each row's new tokens go; `pos` is then left alone and the caller tracks lengths."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0
        self.starts: torch.Tensor | None = None  # per-row mode: [B] position of each row's first new token
        self.rows = slice(0, batch_size)
        self.kv_len = 0
        self.positions: torch.Tensor | None = None  # [B, T], set by the model for the layers
        self.mask: torch.Tensor | None = None       # [B, 1, T, kv_len]

    def reset(self) -> None:
        self.pos = 0

    def bind(self, rows: slice, starts: torch.Tensor, kv_len: int) -> None:
        """Per-row positions for the next forward: batch row i is cache row `rows.start + i`, its T new
        tokens go to positions starts[i] .. starts[i] + T - 1, and it attends to keys 0 .. its own position
        only (later slots hold padding or another turn's stale keys). `kv_len` = max(starts) + T, given
        by the caller so no device sync is needed; it must not exceed `max_len`."""
        self.rows, self.starts, self.kv_len = rows, starts, kv_len


class Attention(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.wq = Linear(c.d_model, c.n_heads * c.head_dim)
        self.wk = Linear(c.d_model, c.n_kv_heads * c.head_dim)
        self.wv = Linear(c.d_model, c.n_kv_heads * c.head_dim)
        self.wo = Linear(c.n_heads * c.head_dim, c.d_model)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn_mask, is_causal = None, True
        if cache is not None and cache.starts is not None:  # rows at their own positions
            ck, cv = cache.k[layer, cache.rows], cache.v[layer, cache.rows]
            b = torch.arange(B, device=x.device).unsqueeze(1)
            ck[b, :, cache.positions] = k.transpose(1, 2)
            cv[b, :, cache.positions] = v.transpose(1, 2)
            k, v = ck[:, :, :cache.kv_len], cv[:, :, :cache.kv_len]
            attn_mask, is_causal = cache.mask, False
        elif cache is not None:
            p = cache.pos
            cache.k[layer, :B, :, p:p + T] = k
            cache.v[layer, :B, :, p:p + T] = v
            k, v = cache.k[layer, :B, :, :p + T], cache.v[layer, :B, :, :p + T]
            if p > 0:  # queries at p..p+T-1 see keys 0..their own position
                is_causal = False
                if T > 1:
                    attn_mask = torch.ones(T, p + T, dtype=torch.bool, device=x.device).tril(diagonal=p)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 = gate, w3 = up, w2 = down."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.w1 = Linear(c.d_model, c.ffn_dim)
        self.w2 = Linear(c.ffn_dim, c.d_model)
        self.w3 = Linear(c.d_model, c.ffn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(c.d_model, c.norm_eps)
        self.attention = Attention(c)
        self.ffn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.feed_forward = FeedForward(c)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))


class LLaMA(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        V = config.padded_vocab_size
        self.tok_embeddings = nn.Embedding(V, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.output = None if config.tie_embeddings else Linear(config.d_model, V)
        cos, sin = rope_cache(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat-like init: uniform(±√3/√fan_in) for block inputs, zero for the residual outputs
        (wo, w2) so every block starts as the identity, N(0, 1) embeddings and a near-zero output head."""
        c = self.config
        for block in self.layers:
            for lin in (block.attention.wq, block.attention.wk, block.attention.wv,
                        block.feed_forward.w1, block.feed_forward.w3):
                bound = math.sqrt(3.0) / math.sqrt(lin.in_features)
                lin.weight.uniform_(-bound, bound)
            block.attention.wo.weight.zero_()
            block.feed_forward.w2.weight.zero_()
            block.attention_norm.weight.fill_(1.0)
            block.ffn_norm.weight.fill_(1.0)
        self.norm.weight.fill_(1.0)
        if self.output is None:
            self.tok_embeddings.weight.normal_(0.0, c.d_model ** -0.5)
        else:
            self.tok_embeddings.weight.normal_(0.0, 1.0)
            self.output.weight.normal_(0.0, 0.001)
        cos, sin = rope_cache(c.head_dim, c.max_seq_len, c.rope_theta, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def _rope(self, start: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start + T > self.rope_cos.shape[0]:  # longer than max_seq_len: extend the table
            cos, sin = rope_cache(self.config.head_dim, max(start + T, 2 * self.rope_cos.shape[0]),
                                  self.config.rope_theta, device=self.rope_cos.device)
            self.rope_cos, self.rope_sin = cos, sin
        return self.rope_cos[start:start + T], self.rope_sin[start:start + T]

    def hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, d_model]."""
        B, T = idx.shape
        x = self.tok_embeddings(idx)
        if cache is not None and cache.starts is not None:
            pos = cache.starts.unsqueeze(1) + torch.arange(T, device=idx.device)  # [B, T]
            self._rope(0, cache.kv_len)
            cos, sin = self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)  # [B, 1, T, D]
            cache.positions = pos
            keys = torch.arange(cache.kv_len, device=idx.device)
            cache.mask = (keys <= pos.unsqueeze(-1)).unsqueeze(1)
        else:
            start = cache.pos if cache is not None else 0
            cos, sin = self._rope(start, T)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i)
        if cache is not None and cache.starts is None:
            cache.pos += T
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        w = self.tok_embeddings.weight if self.output is None else self.output.weight
        logits = linear(h, w)
        V = self.config.vocab_size
        return logits[..., :V] if logits.shape[-1] != V else logits

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                *, cache: KVCache | None = None, reduction: str = "mean") -> Any:
        """Logits [B, T, vocab_size] in float32 without targets; else the mean cross-entropy over scored
        positions (mask True, or every position whose target is not -1); reduction="none" returns what
        `loss_sum` returns (going through forward keeps DDP/FSDP hooks in the loop)."""
        h = self.hidden(idx, cache)
        if targets is None:
            return self.logits(h).float()
        targets = _masked_targets(targets, mask)
        if reduction == "mean" and torch.is_grad_enabled() and h.dtype == torch.float32 \
                and not torch.is_autocast_enabled(h.device.type):
            w = self.tok_embeddings.weight if self.output is None else self.output.weight
            return LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), w[:self.config.vocab_size],
                                            targets.reshape(-1))
        flat = self.logits(h).float().reshape(-1, self.config.vocab_size)
        if reduction == "mean":
            return F.cross_entropy(flat, targets.reshape(-1), ignore_index=-1)
        nats = F.cross_entropy(flat, targets.reshape(-1), ignore_index=-1, reduction="none").view(targets.shape)
        return nats, (targets != -1).float()

    def loss_sum(self, idx: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per position: (nats [B, T] float32, 0 where unscored; scored [B, T] float32, 1 or 0).
        `.sum()` of each gives the total nats and the count; weighting by token bytes gives bpb."""
        return self(idx, targets, mask, reduction="none")


class LinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of (h @ w.T) against targets (-1 = ignored), computed in row chunks that stay in
    cache, with the gradients produced during the forward pass (as Liger's fused linear cross-entropy does).
    The full [N, V] logits and their gradient are never materialised: on a CPU that saves ~25% of a
    cpu-demo training step (page faults and memory traffic of two 64 MB tensors), on a GPU memory."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        N, V = h.shape[0], w.shape[0]
        valid = targets != -1
        count = valid.sum().clamp(min=1).to(h.dtype)
        grad_h = torch.empty_like(h)
        grad_wt = w.new_zeros(w.shape[1], V)  # [d, V]: the layout the chunk products come out in
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        rows = max(32, (1 << 20) // V)  # ~4 MB of fp32 logits per chunk
        for s in range(0, N, rows):
            hc, tc, vc = h[s:s + rows], targets[s:s + rows], valid[s:s + rows]
            logits = mm_nt(hc, w)
            safe = tc.clamp(min=0).unsqueeze(1)
            target_logit = logits.gather(1, safe).squeeze(1)
            top = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(top).exp_()
            total = probs.sum(dim=1, keepdim=True)
            loss += ((total.log() + top).squeeze(1) - target_logit)[vc].sum()
            probs.div_(total)
            probs.scatter_add_(1, safe, -vc.to(probs.dtype).unsqueeze(1))
            probs.mul_(vc.to(probs.dtype).unsqueeze(1) / count)
            grad_h[s:s + rows] = mm_nn(probs, w)
            add_mm_tn_(grad_wt, hc, probs)
        ctx.save_for_backward(grad_h, grad_wt.T.contiguous())
        return loss / count

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None


def _masked_targets(targets: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return targets if mask is None else targets.masked_fill(~mask.bool(), -1)
