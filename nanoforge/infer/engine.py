"""The inference engine: many rows at once over one preallocated KV cache, rows joining and leaving
between steps (continuous batching), per-row sampling and stops, tool calls, and UTF-8-safe streaming.

    engine = Engine(model, tokenizer)
    out = engine.generate([ids_a, ids_b], SamplingParams(temperature=0.8, seed=1), n=2)   # 4 Completions
    for d in engine.stream(ids, SamplingParams(max_tokens=64)):
        print(d.text, end="", flush=True)

    rid = engine.add(ids, params)           # the server's loop: add rows any time, step while there is work
    while engine.has_work():
        for delta in engine.step(): ...

How it works (nanochat's engine with llama.cpp's slots): every row owns one row ("slot") of the KV cache
and its own length. A step first prefills rows that were added since the last step, all of them in one
forward with their prompts right-padded (each row attends to its own keys only, so padding and the other
rows cannot leak in), then feeds the last token of every running row in one forward [rows, 1]. Running
rows always sit in slots 0..n-1: a row that finishes is replaced by the last one, so the decode batch
shrinks as rows end. `n` samples of a prompt are prefilled once and the cache row copied.

Per row: its sampling parameters and seeded generator (same seed, same text, whatever else is in the
batch), stop tokens (`<|assistant_end|>`, BOS), stop strings, a token budget, the model's context, and a
tool state: after `<|python_start|>expr<|python_end|>` the registry's tool runs and its answer is forced as
`<|output_start|>answer<|output_end|>` (mask 0: not sampled, not trained on by RL). Text is decoded
incrementally from token bytes with an incremental UTF-8 decoder, so a delta is always whole characters
and nothing is decoded twice.

The engine is not thread-safe: one thread drives it.
"""

from __future__ import annotations

import codecs
import math
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from nanoforge.errors import UserError
from nanoforge.infer.tools import Tool, ToolRegistry, default_tools
from nanoforge.model.decode import DecodeStep

ASSISTANT_END = "<|assistant_end|>"
# Prefills of at most this many tokens (rows × tokens, all rows at one start) go through the decode step's
# prepared weights (DecodeStep.prefill): 1.2–2× faster than the model's modules up to ~128 tokens on two
# CPU threads (a 54-token turn after 313 cached tokens: 12.7 → 11.1 ms), slower beyond.
SHORT_PREFILL = 128


@dataclass
class SamplingParams:
    """How one row samples. temperature 0 is greedy; top_k None/0 and top_p 1 are off; `seed` fixes the
    row's random stream; `max_tokens` counts every generated token (forced tool output included); `stop`
    strings end the reply and are not part of its text; `stop_token_ids` None means the engine's default
    (`<|assistant_end|>` and BOS), () means none."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int = 0
    max_tokens: int = 256
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)
        t = float(self.temperature)
        if not math.isfinite(t) or t < 0:
            raise UserError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        p = float(self.top_p)
        if not (0.0 < p <= 1.0):
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None:
            if int(self.top_k) < 0:
                raise UserError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
            self.top_k = int(self.top_k) or None
        if int(self.max_tokens) < 1:
            raise UserError(f"max_tokens must be >= 1, got {self.max_tokens}")
        self.temperature, self.top_p, self.max_tokens, self.seed = t, p, int(self.max_tokens), int(self.seed)


@dataclass
class Delta:
    """What one step produced for one row: its new token ids (normally one), the text they completed
    (whole UTF-8 characters; special tokens and stop strings add none), whether the tokens were forced
    (tool output), the conversation part they belong to ("text", "python", "python_output") and, on the
    row's last delta, why it ended ("stop" or "length")."""

    rid: int
    token_ids: list[int]
    text: str
    forced: bool = False
    finish_reason: str | None = None
    part: str = "text"


@dataclass
class Completion:
    """One finished row. `ids`: every token after the prompt (the stop token included, so RL trains on
    ending; forced tool-output tokens included with `mask` 0); `text`: the reply's text parts (what a
    user reads); `parts`: all parts in order ({"type": "text"|"python"|"python_output", "text"}),
    `finish_reason`: "stop" | "length" (| "cancelled"); `cached_tokens`: prompt tokens reused from a
    prefix instead of prefilled; `timings`: ttft_s, prefill_s, decode_s, total_s, tokens_per_s,
    prefill_tokens."""

    ids: list[int]
    mask: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    timings: dict[str, float]
    parts: list[dict[str, str]] = field(default_factory=list)
    cached_tokens: int = 0

    @property
    def completion_tokens(self) -> int:
        return len(self.ids)

    def message(self) -> dict[str, Any]:
        """The reply as a conversation message: plain content when it is all text, else parts."""
        if all(p["type"] == "text" for p in self.parts):
            return {"role": "assistant", "content": self.text}
        return {"role": "assistant", "content": [dict(p) for p in self.parts]}


@dataclass
class CacheSnapshot:
    """The KV cache of one finished row: `ids` are the tokens whose keys and values it holds
    (k, v: [layers, kv_heads, len(ids), head_dim]). A later row whose prompt starts with some of these
    ids skips prefilling them (prefix reuse)."""

    ids: list[int]
    k: torch.Tensor
    v: torch.Tensor


class _Row:
    """Per-row state: position in the cache, sampling stream, tool state, text decoding."""

    def __init__(self, rid: int, prompt: list[int], params: SamplingParams, engine: Engine,
                 prefix: CacheSnapshot | None, keep_cache: bool, seed: int) -> None:
        self.rid, self.prompt, self.params = rid, prompt, params
        self.prefix, self.keep_cache = prefix, keep_cache
        self.leader: _Row | None = None      # the row whose prefill this one copies (n > 1)
        self.gen: torch.Generator | None = None
        if params.temperature > 0:
            self.gen = torch.Generator(device=engine.device).manual_seed(seed)
        self.stop_ids = engine.default_stop_ids if params.stop_token_ids is None else \
            frozenset(int(i) for i in params.stop_token_ids)
        self.slot = -1
        self.length = 0                      # tokens in the cache
        self.last = -1                       # token to feed next
        self.ids: list[int] = []
        self.mask: list[int] = []
        self.forced: deque[int] = deque()
        self.tool: Tool | None = None        # inside a tool call
        self.tool_ids: list[int] = []
        self.part = "text"
        self.parts: list[dict[str, str]] = []
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""                       # the current text part, decoded so far
        self.sent = 0                        # chars of self.text already emitted
        self.finish_reason: str | None = None
        self.cached = 0
        self.t_add = time.perf_counter()
        self.t_first = self.t_done = 0.0
        self.prefill_s = 0.0


class Engine:
    """Batched generation for one model and tokenizer (tokenizer None: ids only, no text or tools)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, *, max_batch: int = 32,
                 tools: ToolRegistry | None = None, compile: bool = False,
                 autocast: torch.dtype | None | str = "auto", keep_results: int = 1024) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.context = int(model.config.max_seq_len)
        param = next(model.parameters())
        self.device = param.device
        if autocast == "auto":
            autocast = torch.bfloat16 if self.device.type == "cuda" and param.dtype == torch.float32 else None
        self.autocast = autocast
        self.cache_dtype = autocast or param.dtype
        self.max_batch = int(max_batch)
        if self.max_batch < 1:
            raise UserError(f"max_batch must be >= 1, got {max_batch}")
        stops = set()
        if tokenizer is not None:
            stops.update(i for i in (tokenizer.special_tokens.get(ASSISTANT_END), tokenizer.bos_id,
                                     tokenizer.eos_id) if i is not None)
        self.default_stop_ids = frozenset(stops)
        if tools is None and tokenizer is not None:
            tools = default_tools()
        self._tool_by_start: dict[int, Tool] = {}
        self._tool_ids: dict[str, tuple[int, int, int]] = {}
        for tool in tools or []:
            ids = [tokenizer.special_tokens.get(t) for t in (tool.start, tool.end, tool.output_start, tool.output_end)]
            if all(i is not None for i in ids):  # a tokenizer without the tool's tokens cannot call it
                self._tool_by_start[ids[0]] = tool
                self._tool_ids[tool.name] = (ids[1], ids[2], ids[3])
        self.tools = tools
        self._cache = None
        self._next_rid = 0
        self._pending: deque[list[_Row]] = deque()   # groups waiting for slots (n samples share a prefill)
        self._active: list[_Row] = []                # by slot: _active[i].slot == i
        self._rows: dict[int, _Row] = {}
        self._done: OrderedDict[int, Completion] = OrderedDict()
        self._snapshots: dict[int, CacheSnapshot] = {}
        self._keep_results = keep_results
        # The decode step (one token per row) is the model's forward at a new position every time: compiled
        # with dynamic shapes it traces once. On a CPU it does not pay (measured slower than eager for
        # cpu-demo, after ~80 s of compiling); it is meant for CUDA, where it removes per-op launch cost.
        self._hidden_decode = torch.compile(model.hidden, dynamic=True) if compile else model.hidden
        # fp32 without compile: the decode step runs as plain tensor operations (nanoforge/model/decode.py)
        self._decode_step = DecodeStep(model) if not compile and DecodeStep.supports(model, autocast) else None

    # ---- public API ------------------------------------------------------------------------------
    def add(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
            prefix: CacheSnapshot | None = None, keep_cache: bool = False) -> int:
        """Queue a row; it is prefilled at the next `step`. `prefix`: a snapshot whose matching leading
        ids are reused instead of prefilled; `keep_cache`: keep this row's cache when it finishes
        (`snapshot(rid)`). Returns the row id."""
        return self._add_group(prompt_ids, params or SamplingParams(), 1, prefix, keep_cache)[0]

    def step(self) -> list[Delta]:
        """One token for every running row: rows added since the last step are prefilled first and get
        their first token; finished rows leave the batch. Returns one delta per row that advanced."""
        deltas: list[Delta] = []
        decoding = list(self._active)
        admitted = self._admit()
        with torch.no_grad(), self._autocast():
            if admitted:
                deltas += self._prefill(admitted)
            if decoding:
                deltas += self._decode(decoding)
        self._drop_finished()
        return deltas

    def has_work(self) -> bool:
        return bool(self._active or self._pending)

    def cancel(self, rid: int) -> None:
        """Stop a row now (no more deltas; its result has finish_reason "cancelled")."""
        row = self._rows.get(rid)
        if row is None or row.finish_reason is not None:
            return
        for group in list(self._pending):
            if row in group:
                group.remove(row)
                if not group:
                    self._pending.remove(group)
        self._finish(row, "cancelled")
        if row.slot >= 0:
            self._drop_finished()
        else:
            self._record(row)

    def result(self, rid: int) -> Completion | None:
        """The finished row's Completion (None while it runs); kept for the last `keep_results` rows."""
        return self._done.get(rid)

    def pop_result(self, rid: int) -> Completion | None:
        return self._done.pop(rid, None)

    def snapshot(self, rid: int) -> CacheSnapshot | None:
        """The cache of a finished row added with keep_cache=True (handed over once)."""
        return self._snapshots.pop(rid, None)

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
               prefix: CacheSnapshot | None = None, keep_cache: bool = False) -> Iterator[Delta]:
        """Deltas of one row as they come (drives the whole engine: for a single user). Closing the
        iterator early cancels the row. The Completion is `engine.result(rid)` with rid = first delta's."""
        rid = self.add(prompt_ids, params, prefix=prefix, keep_cache=keep_cache)
        row = self._rows[rid]
        try:
            while row.finish_reason is None:
                for d in self.step():
                    if d.rid == rid:
                        yield d
        finally:
            if row.finish_reason is None:
                self.cancel(rid)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None, n: int = 1
                 ) -> list[Completion]:
        """Completions of every prompt, `n` samples each (sample i seeded with params.seed + i), in order:
        prompt 0's samples, prompt 1's, ... Rows beyond `max_batch` wait for free slots."""
        params = params or SamplingParams()
        if n < 1:
            raise UserError(f"n must be >= 1, got {n}")
        rids = [rid for p in prompts for rid in self._add_group(p, params, n, None, False)]
        got: dict[int, Completion] = {}
        while len(got) < len(rids):
            self.step()
            got.update((r, self._done.pop(r)) for r in rids if r in self._done)
        return [got[r] for r in rids]

    # ---- admission and prefill -------------------------------------------------------------------
    def _add_group(self, prompt_ids: Sequence[int], params: SamplingParams, n: int,
                   prefix: CacheSnapshot | None, keep_cache: bool) -> list[int]:
        prompt = self._check_prompt(prompt_ids)
        if n > self.max_batch:
            raise UserError(f"n={n} samples exceed the engine's max_batch ({self.max_batch})")
        group = []
        for i in range(n):
            rid = self._next_rid
            self._next_rid += 1
            row = _Row(rid, prompt, params, self, prefix if i == 0 else None, keep_cache, params.seed + i)
            self._rows[rid] = row
            group.append(row)
        for row in group[1:]:
            row.leader = group[0]
        self._pending.append(group)
        return [r.rid for r in group]

    def _check_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise UserError("the prompt is empty: give some text or token ids")
        V = self.config.vocab_size
        if min(ids) < 0 or max(ids) >= V:
            raise UserError(f"prompt token ids must lie in [0, {V}): is this the model's tokenizer?")
        if len(ids) >= self.context:
            raise UserError(f"the prompt has {len(ids)} tokens but the model's context is {self.context}: "
                            f"shorten it (or /clear the conversation)")
        return ids

    def _admit(self) -> list[_Row]:
        admitted: list[_Row] = []
        while self._pending and len(self._active) + len(admitted) + len(self._pending[0]) <= self.max_batch:
            admitted += self._pending.popleft()
        if not admitted:
            return []
        self._ensure_capacity(len(self._active) + len(admitted))
        # leaders first (their prefill forward uses consecutive slots), copies after
        admitted.sort(key=lambda r: r.leader is not None)
        for row in admitted:
            row.slot = len(self._active)
            self._active.append(row)
        return admitted

    def _ensure_capacity(self, rows: int) -> None:
        from nanoforge.model import KVCache

        have = 0 if self._cache is None else self._cache.k.shape[1]
        if rows <= have:
            return
        cap = min(self.max_batch, max(rows, 2 * have, 4))
        cache = KVCache(self.config, cap, self.context, device=self.device, dtype=self.cache_dtype)
        if self._cache is not None:
            cache.k[:, :have].copy_(self._cache.k)
            cache.v[:, :have].copy_(self._cache.v)
        self._cache = cache

    def _prefill(self, rows: list[_Row]) -> list[Delta]:
        cache = self._cache
        leaders = [r for r in rows if r.leader is None]
        t0 = time.perf_counter()
        for r in leaders:
            if r.prefix is not None:
                c = _common_prefix(r.prefix.ids, r.prompt)
                c = min(c, len(r.prompt) - 1)  # at least one token is fed to get the next logits
                if c > 0:
                    cache.k[:, r.slot, :, :c].copy_(r.prefix.k[:, :, :c])
                    cache.v[:, r.slot, :, :c].copy_(r.prefix.v[:, :, :c])
                r.cached = c
                r.prefix = None
        tokens = [r.prompt[r.cached:] for r in leaders]
        starts = [r.cached for r in leaders]
        width = max(len(t) for t in tokens)
        if max(starts) + width <= self.context:
            logits = self._forward(leaders[0].slot, tokens, starts)
        else:  # padding to the longest would run past the cache for some row: one forward per row
            logits = torch.cat([self._forward(r.slot, [t], [s]) for r, t, s in zip(leaders, tokens, starts)])
        by_leader = {}
        for r, lg, t in zip(leaders, logits, tokens):
            r.length = r.cached + len(t)
            by_leader[r.rid] = lg
        for r in rows:
            if r.leader is not None:
                lead = r.leader
                r.cached, r.length = lead.cached, lead.length
                cache.k[:, r.slot, :, :r.length].copy_(cache.k[:, lead.slot, :, :r.length])
                cache.v[:, r.slot, :, :r.length].copy_(cache.v[:, lead.slot, :, :r.length])
        order = [by_leader[(r.leader or r).rid] for r in rows]
        logits = torch.stack(order)
        dt = time.perf_counter() - t0
        for r in rows:
            r.prefill_s = dt
        return self._advance(rows, logits, first=True)

    def _decode(self, rows: list[_Row]) -> list[Delta]:
        if self._decode_step is not None:
            tokens = torch.tensor([r.last for r in rows], device=self.device)
            logits = self._decode_step(tokens, [r.length for r in rows], self._cache)
        else:
            logits = self._forward(0, [[r.last] for r in rows], [r.length for r in rows])
        for r in rows:
            r.length += 1
        return self._advance(rows, logits, first=False)

    def _forward(self, slot: int, tokens: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Next-token logits [rows, V] (float32) after feeding `tokens[i]` (right-padded to one width) to
        cache row slot + i at positions starts[i]..; only each row's last real position is projected."""
        B = len(tokens)
        width = max(len(t) for t in tokens)
        if self._decode_step is not None and 1 < width and B * width <= SHORT_PREFILL and len(set(starts)) == 1 \
                and all(len(t) == width for t in tokens):  # a new turn after a cached prefix, short prompts
            idx = torch.tensor(tokens, device=self.device)
            return self._decode_step.prefill(idx, starts[0], self._cache, row=slot)
        if width == 1:
            idx = torch.tensor(tokens)
        else:
            idx = torch.zeros(B, width, dtype=torch.long)
            for i, t in enumerate(tokens):
                idx[i, :len(t)] = torch.tensor(t)
        idx = idx.to(self.device, non_blocking=True)
        self._cache.bind(slice(slot, slot + B), starts, width)
        h = (self.model.hidden if width > 1 else self._hidden_decode)(idx, cache=self._cache)
        if width > 1:
            last = torch.tensor([len(t) - 1 for t in tokens], device=self.device)
            h = h[torch.arange(B, device=self.device), last]
        else:
            h = h[:, 0]
        return self.model.logits(h).float()

    def _autocast(self) -> Any:
        if self.autocast is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast)

    # ---- sampling and per-row transitions --------------------------------------------------------
    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        out = logits.argmax(dim=-1).tolist()
        for i, r in enumerate(rows):
            p = r.params
            if p.temperature == 0 or r.forced:
                continue
            lg = logits[i] / p.temperature
            if p.top_k is not None and p.top_k < lg.shape[-1]:
                kth = torch.topk(lg, p.top_k).values[-1]
                lg = lg.masked_fill(lg < kth, float("-inf"))
            probs = torch.softmax(lg, dim=-1)
            if p.top_p < 1.0:
                sp, si = torch.sort(probs, descending=True)
                drop = (sp.cumsum(0) - sp) > p.top_p  # keep the smallest head whose mass reaches top_p
                probs = probs.scatter(0, si, sp.masked_fill(drop, 0.0))
            out[i] = int(torch.multinomial(probs, 1, generator=r.gen))
        return out

    def _advance(self, rows: list[_Row], logits: torch.Tensor, first: bool) -> list[Delta]:
        sampled = self._sample(rows, logits)
        now = time.perf_counter()
        deltas = []
        for r, tok in zip(rows, sampled):
            if first:
                r.t_first = now
            forced = bool(r.forced)
            if forced:
                tok = r.forced.popleft()
            deltas.append(self._take(r, tok, forced))
        return deltas

    def _take(self, r: _Row, tok: int, forced: bool) -> Delta:
        """Append one token to the row: tool-call transitions, text, stops. Returns the row's delta."""
        r.ids.append(tok)
        r.mask.append(0 if forced else 1)
        r.last = tok
        part, text, reason = r.part, "", None
        if forced:
            if r.forced:                          # output-start or the answer's tokens
                text = self._piece(r, self._bytes(tok))
            else:                                 # output-end: back to text
                text = self._close_part(r)
                r.part = "text"
        elif tok in self._tool_by_start:   # a tool call opens (a second start inside one starts it again)
            text = self._close_part(r) if r.tool is None else ""
            r.tool, r.tool_ids = self._tool_by_start[tok], []
            r.part = part = r.tool.part
        elif r.tool is not None and tok == self._tool_ids[r.tool.name][0]:   # ... and closes
            _, out_start, out_end = self._tool_ids[r.tool.name]
            text = self._close_part(r)
            answer = ToolRegistry.call(r.tool, self.tokenizer.decode(r.tool_ids))
            r.forced.extend([out_start, *self.tokenizer.encode(answer), out_end])
            r.part, r.tool = r.tool.part + "_output", None
        elif tok in r.stop_ids:
            reason = "stop"
        else:
            if r.tool is not None:
                r.tool_ids.append(tok)
            text = self._piece(r, self._bytes(tok))
            if r.part == "text" and r.params.stop and self._stop_string(r):
                reason = "stop"
            text = text if r.part != "text" or not r.params.stop else self._safe_text(r)
        if reason is None and (len(r.ids) >= r.params.max_tokens or r.length + 1 > self.context):
            reason = "length"
        if reason is not None:
            text += self._close_part(r)
            self._finish(r, reason)
        return Delta(r.rid, [tok], text, forced, reason, part)

    def _bytes(self, tok: int) -> bytes:
        return self.tokenizer.id_bytes(tok) if self.tokenizer is not None else b""

    def _piece(self, r: _Row, data: bytes) -> str:
        """Whole characters completed by `data` in the current part (text parts with stop strings are
        sent by `_safe_text` instead, which holds back what could start a stop string)."""
        s = r.decoder.decode(data)
        r.text += s
        if r.part == "text" and r.params.stop:
            return ""
        r.sent = len(r.text)
        return s

    def _stop_string(self, r: _Row) -> bool:
        """Cut the text at the first stop string that appeared (searching only the new tail)."""
        stops = r.params.stop
        lo = max(0, r.sent - max(len(s) for s in stops) + 1)
        cut = min((i for i in (r.text.find(s, lo) for s in stops) if i >= 0), default=-1)
        if cut < 0:
            return False
        r.text = r.text[:max(cut, r.sent)]
        return True

    def _safe_text(self, r: _Row) -> str:
        stops = r.params.stop
        hold = max((k for s in stops for k in range(1, len(s)) if r.text.endswith(s[:k])), default=0)
        safe = len(r.text) - hold
        out = r.text[r.sent:safe] if safe > r.sent else ""
        r.sent = max(r.sent, safe)
        return out

    def _close_part(self, r: _Row) -> str:
        """End the current part: flush its decoder and record it; returns its text not yet sent."""
        r.text += r.decoder.decode(b"", final=True)
        out = r.text[r.sent:]
        if r.text or r.part != "text":
            if r.parts and r.parts[-1]["type"] == r.part:
                r.parts[-1]["text"] += r.text
            else:
                r.parts.append({"type": r.part, "text": r.text})
        r.decoder.reset()
        r.text, r.sent = "", 0
        return out

    def _finish(self, r: _Row, reason: str) -> None:
        r.finish_reason = reason
        r.t_done = time.perf_counter()

    # ---- finished rows ---------------------------------------------------------------------------
    def _drop_finished(self) -> None:
        cache = self._cache
        for r in [r for r in self._active if r.finish_reason is not None]:
            if r.keep_cache:
                fed = (r.prompt + r.ids)[:r.length]
                self._snapshots[r.rid] = CacheSnapshot(fed, cache.k[:, r.slot, :, :r.length].clone(),
                                                       cache.v[:, r.slot, :, :r.length].clone())
            last = self._active.pop()
            if last is not r:  # the last running row takes the finished row's slot
                n = last.length
                cache.k[:, r.slot, :, :n].copy_(cache.k[:, last.slot, :, :n])
                cache.v[:, r.slot, :, :n].copy_(cache.v[:, last.slot, :, :n])
                last.slot = r.slot
                self._active[r.slot] = last
            r.slot = -1
            self._record(r)

    def _record(self, r: _Row) -> None:
        parts = [p for p in r.parts if p["type"] != "text" or p["text"]]
        text = "".join(p["text"] for p in parts if p["type"] == "text")
        t_first = r.t_first or r.t_done
        decode_s = max(r.t_done - t_first, 0.0)
        timings = {"ttft_s": t_first - r.t_add, "prefill_s": r.prefill_s, "decode_s": decode_s,
                   "total_s": r.t_done - r.t_add, "prefill_tokens": float(len(r.prompt) - r.cached),
                   "tokens_per_s": (len(r.ids) - 1) / decode_s if decode_s > 0 and len(r.ids) > 1 else 0.0}
        self._done[r.rid] = Completion(r.ids, r.mask, text, r.finish_reason or "cancelled", len(r.prompt),
                                       timings, parts, r.cached)
        while len(self._done) > self._keep_results:
            self._done.popitem(last=False)
        del self._rows[r.rid]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# ---- the simple text API (sample, training-time samples, speedrun) --------------------------------
def _prompt_ids(tokenizer: Any, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, bos=tokenizer.bos_id is not None)
    else:
        ids = [int(i) for i in prompt]
    if not ids:
        raise UserError("the prompt is empty: give some text or token ids")
    return ids


def generate_ids(model: torch.nn.Module, prompt_ids: Sequence[int], *, max_new_tokens: int,
                 temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
                 stop_ids: Sequence[int] = ()) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids after `prompt_ids` (stops before any id in `stop_ids`)."""
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    params = SamplingParams(temperature=temperature, top_k=top_k, seed=seed, max_tokens=max(1, max_new_tokens),
                            stop_token_ids=tuple(stop_ids))
    engine = Engine(model, None, max_batch=1)
    ids = engine._check_prompt(prompt_ids)
    if max_new_tokens == 0:
        return
    for d in engine.stream(ids, params):
        if d.finish_reason == "stop":
            return
        yield from d.token_ids


def stream(model: torch.nn.Module, tokenizer: Any, prompt: str | Sequence[int], *, max_new_tokens: int,
           temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
           stop: Sequence[str] | None = None, top_p: float = 1.0) -> Iterator[str]:
    """Yield the continuation of `prompt` in text pieces; ends at the end-of-text token, after
    `max_new_tokens`, or before the first stop string (which is not yielded). No tools: this continues
    text; chat replies go through `Engine` or `Session`."""
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                            max_tokens=max(1, max_new_tokens), stop=tuple(stop or ()))
    ids = _prompt_ids(tokenizer, prompt)
    if max_new_tokens <= 0:
        return
    engine = Engine(model, tokenizer, max_batch=1, tools=ToolRegistry())
    for d in engine.stream(ids, params):
        if d.text:
            yield d.text


def generate(model: torch.nn.Module, tokenizer: Any, prompt: str | Sequence[int], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
             stop: Sequence[str] | None = None, top_p: float = 1.0) -> str:
    """The continuation of `prompt` (text, encoded with BOS; or token ids) as text, without the prompt.
    Greedy at temperature 0; otherwise sampled with a generator seeded by `seed` (same seed, same text)."""
    return "".join(stream(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=top_k, seed=seed, stop=stop, top_p=top_p))


def load_checkpoint(checkpoint: Any, device: str | torch.device = "cpu", tokenizer: Any = None
                    ) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """(model in eval mode, its tokenizer, meta) for a checkpoint tag folder or model file. The tokenizer
    is the one the meta names (path, then name under tokenizers/) unless given; a tokenizer whose
    fingerprint differs from the one the model was trained with is refused."""
    from nanoforge.checkpoint import load_model
    from nanoforge.tokenizer import Tokenizer

    model, meta = load_model(checkpoint, device=device)
    info = meta.get("tokenizer") or {}
    if tokenizer is None:
        candidates = [c for c in (info.get("path"), info.get("name")) if c]
        for c in candidates:
            try:
                tokenizer = Tokenizer.load(c)
                break
            except UserError:
                continue
        if tokenizer is None:
            raise UserError(f"cannot find the tokenizer of checkpoint {checkpoint} (its meta names "
                            f"{candidates or 'none'}); pass --tokenizer NAME_OR_PATH")
    elif isinstance(tokenizer, str):
        tokenizer = Tokenizer.load(tokenizer)
    fp = info.get("fingerprint")
    if fp and tokenizer.fingerprint != fp:
        raise UserError(f"tokenizer {tokenizer.name} (fingerprint {tokenizer.fingerprint}) is not the one checkpoint "
                        f"{checkpoint} was trained with ({fp})")
    return model, tokenizer, meta


def pick_device(device: str | None = None) -> str:
    """`device`, or "cuda" when a GPU is available, else "cpu"."""
    if device and device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"
