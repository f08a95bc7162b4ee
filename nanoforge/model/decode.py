"""One decoding step of the LLaMA model for inference: the arithmetic of `LLaMA.hidden` + `logits` for one
new token per row, as plain tensor operations over weights prepared once.

At one token per row the model's forward is mostly overhead, not arithmetic: module calls, autograd
Functions (the CPU RMSNorm and rotary go through Function.apply even under no_grad), three products
where one would do, per-layer masks and position tensors. Here a layer is ~18 computing tensor
operations (and a few views):

- q, k and v come from one product with the concatenated weight, gate and up (w1|w3) from another;
- each RMSNorm's weight (and its √d) is folded into the product that follows it, so a norm is
  three operations (‖x‖, hypot with √(d·eps), divide);
- the residual adds ride on the products (addmm);
- the rotary rows, the key mask, the cache views and the buffers are made once per step for all layers,
  and queries and keys are rotated together straight into the buffer the attention reads;
- products are computed transposed (W @ xᵀ), MKL's fastest form for a few rows; a single row (a chat)
  multiplies x @ Wᵀ with [in, out] copies of the weights instead, made on its first step.

    step = DecodeStep(model)                  # when DecodeStep.supports(model, autocast)
    logits = step(tokens, lengths, cache)     # tokens [B]: row i at position lengths[i] of cache row i
    logits = step.prefill(ids, start, cache)  # ids [B, T] at positions start.. of cache rows 0..B-1

The prepared weights are copies (the model's parameters stay as they are): about 2/3 of the blocks'
weights again in memory, twice that once one-row steps have run. They are rebuilt when any parameter changes (its version counter or storage
moves: an optimizer step, load_state_dict), so training the model in place between generations (RL)
needs nothing from the caller. fp32 only: under autocast the model's own path does its casts. The
results equal the model's forward up to float32 rounding (summation order), not bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from nanoforge.model.llama import KVCache, LLaMA


class DecodeStep:
    """Next-token logits [B, vocab_size] (float32) for one token per row, rows 0..B-1 of the cache."""

    def __init__(self, model: LLaMA) -> None:
        c = model.config
        self.model = model
        self.H, self.Hkv, self.D = c.n_heads, c.n_kv_heads, c.head_dim
        self.d = c.d_model
        self.qk_eps = c.norm_eps if c.qk_norm else None
        self.swiglu = c.mlp == "swiglu"
        self.ffn = c.ffn_dim
        self.cap = c.logit_softcap
        self._params = list(model.parameters())
        self._key: list[tuple[int, int]] | None = None
        self._rows: tuple[list[tuple[torch.Tensor | None, ...]], torch.Tensor] | None = None  # one row's copies
        # ‖x‖ → rms: x / sqrt(‖x‖²/d + eps) = √d · x / hypot(‖x‖, √(d·eps)); √d goes into the weights
        self._hypot_c = torch.tensor(math.sqrt(c.d_model * c.norm_eps), device=model.rope_cos.device)

    @staticmethod
    def supports(model: torch.nn.Module, autocast: torch.dtype | None) -> bool:
        """The model is our LLaMA in float32, runs without autocast, and its `hidden` and `logits` are
        LLaMA's own (not replaced on the instance or in a subclass: then the caller wants those)."""
        own = all(getattr(type(model), f, None) is getattr(LLaMA, f) and f not in vars(model)
                  for f in ("hidden", "logits"))
        return isinstance(model, LLaMA) and own and autocast is None \
            and all(p.dtype == torch.float32 for p in model.parameters())

    def _prepare(self) -> None:
        key = [(p.data_ptr(), p._version) for p in self._params]
        if key == self._key:
            return
        m, root_d = self.model, math.sqrt(self.d)

        def fold(w: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
            """w · diag(norm weight · √d)."""
            return w * (root_d if norm.weight is None else norm.weight * root_d)

        with torch.no_grad():
            self.layers = []
            for layer in m.layers:
                att, ff = layer.attention, layer.feed_forward
                qkv = torch.cat((att.wq.weight, att.wk.weight, att.wv.weight))
                bias = None if att.wq.bias is None else torch.cat((att.wq.bias, att.wk.bias, att.wv.bias))[:, None]
                up = ff.w1.weight if ff.w3 is None else torch.cat((ff.w1.weight, ff.w3.weight))
                self.layers.append((fold(qkv, layer.attention_norm), bias, att.wo.weight,
                                    fold(up, layer.ffn_norm), ff.w2.weight))
            w = m.tok_embeddings.weight if m.output is None else m.output.weight
            self.out = fold(w[:m.config.vocab_size], m.norm)
            self._rows = None
            self.embed_scale = None
            if m.embed_norm is not None:
                en = m.embed_norm.weight
                self.embed_scale = (torch.full((self.d,), root_d, device=w.device) if en is None else en * root_d)[:, None]
        self._key = key

    def _row_weights(self) -> tuple[list[tuple[torch.Tensor | None, ...]], torch.Tensor]:
        """The layers' and the output's weights transposed ([in, out], row-major; biases as they are), made
        on the first one-row step: for a single row x @ Wᵀ streams the weight row by row, 1.4–1.9× faster
        than W @ xᵀ on an AVX2 EPYC when the weights come from L3 or memory (a chat's decode); for more
        rows W @ xᵀ is faster."""
        if self._rows is None:
            with torch.no_grad():
                self._rows = ([(qkv.t().contiguous(), bias, wo.t().contiguous(), up.t().contiguous(),
                                w2.t().contiguous()) for qkv, bias, wo, up, w2 in self.layers],
                              self.out.t().contiguous())
        return self._rows

    def _unit(self, xt: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """xᵀ [d, B] / rms / √d into `out` (the √d and the norm weight are in the next product's weight)."""
        return torch.div(xt, torch.hypot(torch.linalg.vector_norm(xt, dim=0, keepdim=True), self._hypot_c), out=out)

    def __call__(self, tokens: torch.Tensor, lengths: Sequence[int], cache: KVCache) -> torch.Tensor:
        self._prepare()
        m = self.model
        H, Hkv, D = self.H, self.Hkv, self.D
        B, dev = tokens.shape[0], tokens.device
        p_max = max(lengths)
        kv_len = p_max + 1
        m._rope(0, kv_len)  # extends the tables if ever needed
        if min(lengths) == p_max:  # one position: table rows broadcast, keys need no mask
            cos, sin = m.rope_cos[p_max], m.rope_sin[p_max]                            # [D]
            mask = None
            k_new, v_new = cache.k[:, :B, :, p_max].unbind(0), cache.v[:, :B, :, p_max].unbind(0)
        else:
            pos = torch.tensor(lengths, device=dev)
            cos, sin = m.rope_cos[pos].view(B, 1, 1, D), m.rope_sin[pos].view(B, 1, 1, D)
            mask = (torch.arange(kv_len, device=dev) <= pos.unsqueeze(1)).view(B, 1, 1, kv_len)
            rows = torch.arange(B, device=dev)
        keys, values = cache.k[:, :B, :, :kv_len].unbind(0), cache.v[:, :B, :, :kv_len].unbind(0)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k, v = k[:, :, 0], v[:, :, 0]
            if mask is None:
                k_new[i].copy_(k)
                v_new[i].copy_(v)
            else:
                cache.k[i, rows, :, pos] = k
                cache.v[i, rows, :, pos] = v
            # The query heads of one kv head as that head's queries ([B, Hkv, H/Hkv, D], one position):
            # every query sees every key of its row, so attention needs no GQA expansion and reads each kv
            # head once (~8% faster than enable_gqa when the cache comes from memory).
            y = F.scaled_dot_product_attention(q.view(B, Hkv, H // Hkv, D), keys[i], values[i], attn_mask=mask)
            return y.view(B, H, 1, D)

        if B == 1:  # [d, 1] and [1, d] are the same memory: x @ Wᵀ with the [in, out] copies, seen as W @ xᵀ
            layers, out_w = self._row_weights()
            return self._forward(tokens.view(B, 1), cos, sin, attend, layers, out_w, _mm_row, _addmm_row)
        return self._forward(tokens.view(B, 1), cos, sin, attend, self.layers, self.out, torch.mm, torch.addmm)

    def prefill(self, tokens: torch.Tensor, start: int, cache: KVCache, row: int = 0) -> torch.Tensor:
        """Next-token logits [B, vocab_size] after feeding tokens [B, T] to cache rows row..row+B-1 at
        positions start..start+T-1 (every row at the same start: a conversation's new turn after its cached
        prefix, or prompts of one length). Writes their keys and values into the cache and projects only
        the last position, with the same prepared weights and W @ xᵀ products as a decode step: for a
        short prefill the model's modules cost more than its arithmetic (at 54 tokens after a 313-token
        prefix, two threads: ~5.8 ms of the model's 12 ms are neither products nor attention)."""
        self._prepare()
        T, end, rows = tokens.shape[1], start + tokens.shape[1], slice(row, row + tokens.shape[0])
        cos, sin = self.model._rope(start, T)                                        # [T, D]
        mask = None if start == 0 else torch.ones(T, end, dtype=torch.bool, device=tokens.device).tril(diagonal=start)

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache.k[i, rows, :, start:end].copy_(k)
            cache.v[i, rows, :, start:end].copy_(v)
            return F.scaled_dot_product_attention(q, cache.k[i, rows, :, :end], cache.v[i, rows, :, :end],
                                                  attn_mask=mask, is_causal=mask is None,
                                                  enable_gqa=self.Hkv != self.H)

        return self._forward(tokens, cos, sin, attend, self.layers, self.out, torch.mm, torch.addmm)

    def _forward(self, tokens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Any,
                 layers: list[tuple[torch.Tensor | None, ...]], out_w: torch.Tensor, mm: Any, addmm: Any
                 ) -> torch.Tensor:
        """The blocks over tokens [B, T] and the logits [B, V] of each row's last position. `cos`/`sin`
        broadcast to [B, heads, T, D]; attend(layer, q [B, H, T, D], k, v [B, Hkv, T, D]) stores the keys
        and values and returns the attention output as [B, H, T, D]; mm(W, aᵀ) / addmm(acc, W, aᵀ) are
        the products with `layers`' and `out_w`'s weights.

        Products are computed transposed, W @ aᵀ ([out, N]) with a [N, in] row-major: MKL's fastest form
        for a few rows (1.6× F.linear at 8 rows on an AVX2 EPYC). So the residual stream is kept as
        xᵀ [d, N] (column b·T + t), normalised activations are written row-major into `a`, and the
        residual adds ride on the products (addmm). Buffers are reused by every layer."""
        m = self.model
        H, Hkv, D = self.H, self.Hkv, self.D
        B, T = tokens.shape
        N, dev = B * T, tokens.device
        sin_lo, sin_hi = sin.chunk(2, -1)
        a = torch.empty(N, self.d, device=dev)
        at = a.t()
        r = torch.empty(B, H + Hkv, T, D, device=dev)   # rotated queries and keys
        r_lo, r_hi = r.chunk(2, -1)
        g = torch.empty(N, self.ffn, device=dev)
        gt = g.t()
        xt = F.embedding(tokens.reshape(-1), m.tok_embeddings.weight).t()
        if self.embed_scale is not None:
            xt = self._unit(xt, torch.empty_like(xt)).mul_(self.embed_scale)
        split_qkv = [(H + Hkv) * D, Hkv * D]   # Tensor.split is a Python wrapper: the native ops are cheaper
        for i, (w_qkv, b_qkv, w_o, w_up, w_2) in enumerate(layers):
            self._unit(xt, at)
            qkv = mm(w_qkv, at) if b_qkv is None else addmm(b_qkv, w_qkv, at)   # [(H+2Hkv)·D, N]
            qk, v = qkv.split_with_sizes(split_qkv)
            qk = qk.view(H + Hkv, D, B, T).permute(2, 0, 3, 1)          # [B, H + Hkv, T, D] views
            qk_lo, qk_hi = qk.chunk(2, -1)
            # rotate-half rotary of llama._Rope on queries and keys at once: x·cos + (-x2, x1)·sin
            torch.mul(qk, cos, out=r)
            r_lo.addcmul_(qk_hi, sin_lo, value=-1.0)
            r_hi.addcmul_(qk_lo, sin_hi)
            if self.qk_eps is not None:  # nanochat: parameter-free, after the rotary
                r.copy_(F.rms_norm(r, (D,), None, self.qk_eps))
            y = attend(i, r[:, :H], r[:, H:], v.view(Hkv, D, B, T).permute(2, 0, 3, 1))
            xt = addmm(xt, w_o, y.transpose(1, 2).reshape(N, H * D).t())
            self._unit(xt, at)
            u = mm(w_up, at)                                 # [ffn (·2), N]
            if self.swiglu:
                gate, up = u.chunk(2)
                torch.mul(F.silu(gate), up, out=gt)
            else:
                torch.square(F.relu_(u), out=gt)
            xt = addmm(xt, w_2, gt)
        last = at[:, :B]                                     # [d, B]: a[:B] row-major
        self._unit(xt.view(self.d, B, T)[:, :, -1], last)
        logits = mm(out_w, last).t().contiguous()
        cap = self.cap
        return cap * torch.tanh(logits / cap) if cap else logits


def _mm_row(wt: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """W @ xᵀ for one row, from Wᵀ [in, out]: (x @ Wᵀ)ᵀ."""
    return torch.mm(xt.t(), wt).t()


def _addmm_row(acc: torch.Tensor, wt: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """acc + W @ xᵀ for one row, from Wᵀ [in, out]."""
    return torch.addmm(acc.t(), xt.t(), wt).t()
