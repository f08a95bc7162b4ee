"""A stand-in with the engine's step API (add/step/cancel/has_work), one KV cache per row, one forward per
row per step. Used only while nanoforge.infer.engine has no batched Engine."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int = 0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()


@dataclass
class Delta:
    rid: int
    token_ids: list[int]
    text: str
    forced: list[bool] = field(default_factory=list)
    finish_reason: str | None = None


class _Row:
    def __init__(self, prompt: list[int], params: SamplingParams, cache: Any, device: Any) -> None:
        self.prompt, self.params, self.cache = prompt, params, cache
        self.gen = torch.Generator(device=device).manual_seed(params.seed)
        self.out: list[int] = []
        self.sent = ""
        self.logits: torch.Tensor | None = None


class SimpleEngine:
    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_batch: int = 8) -> None:
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self._rows: dict[int, _Row] = {}
        self._ids = itertools.count()
        stops = [tokenizer.eos_id, tokenizer.bos_id]
        try:
            stops.append(tokenizer.special_id("<|assistant_end|>"))
        except Exception:
            pass
        self.stop_ids = {i for i in stops if i is not None}

    def add(self, prompt_ids: list[int], params: SamplingParams) -> int:
        from nanoforge.model import KVCache

        p = next(self.model.parameters())
        limit = self.model.config.max_seq_len
        ids = list(prompt_ids)[-max(1, limit - params.max_tokens):]
        cache = KVCache(self.model.config, 1, min(limit, len(ids) + params.max_tokens), device=p.device,
                        dtype=p.dtype)
        rid = next(self._ids)
        self._rows[rid] = _Row(ids, params, cache, p.device)
        return rid

    def cancel(self, rid: int) -> None:
        self._rows.pop(rid, None)

    def has_work(self) -> bool:
        return bool(self._rows)

    @torch.no_grad()
    def step(self) -> list[Delta]:
        from nanoforge.infer.engine import _pick

        p = next(self.model.parameters())
        out = []
        for rid, row in list(self._rows.items()):
            feed = row.prompt if row.logits is None else [row.out[-1]]
            row.logits = self.model(torch.tensor([feed], device=p.device), cache=row.cache)[0, -1]
            tok = _pick(row.logits, row.params.temperature, row.params.top_k, row.gen)
            finish = None
            if tok in self.stop_ids:
                out.append(Delta(rid, [], self._flush(row), [], "stop"))
                del self._rows[rid]
                continue
            row.out.append(tok)
            text = self.tokenizer.decode(row.out)
            piece = ""
            if not text.endswith("\ufffd"):
                piece, row.sent = text[len(row.sent):], text
            for s in row.params.stop:
                cut = text.find(s)
                if cut >= 0:
                    finish = "stop"
                    piece = text[len(row.sent) - len(piece):cut] if cut >= len(row.sent) - len(piece) else ""
                    break
            if finish is None and (len(row.out) >= row.params.max_tokens
                                   or row.cache.pos >= row.cache.max_len):
                finish = "length"
                piece += self._flush(row)
            out.append(Delta(rid, [tok], piece, [False], finish))
            if finish:
                del self._rows[rid]
        return out

    def _flush(self, row: _Row) -> str:
        text = self.tokenizer.decode(row.out)
        rest, row.sent = text[len(row.sent):], text
        return rest


def render_for_completion(tok: Any, conv: list[dict[str, Any]]) -> list[int]:
    """nanochat's layout, for tokenizers without `render_for_completion` yet."""
    sid = tok.special_id
    ids = [tok.bos_id] if tok.bos_id is not None else []
    system = ""
    for m in conv:
        content = m["content"]
        text = content if isinstance(content, str) else "".join(p["text"] for p in content)
        if m["role"] == "system":
            system = text + "\n\n"
        elif m["role"] == "user":
            ids += [sid("<|user_start|>"), *tok.encode(system + text), sid("<|user_end|>")]
            system = ""
        elif m["role"] == "assistant":
            ids += [sid("<|assistant_start|>"), *tok.encode(text), sid("<|assistant_end|>")]
    if conv and conv[-1]["role"] == "assistant":
        ids = ids[:-1]
    else:
        ids.append(sid("<|assistant_start|>"))
    return ids
