"""Text generation with a KV cache: greedy at temperature 0, else temperature / top-k sampling with a
seeded generator, stop strings, and a streaming variant that yields text pieces as they become valid UTF-8.

    text = generate(model, tokenizer, "Es war einmal", max_new_tokens=32)
    for piece in stream(model, tokenizer, "Es war einmal", max_new_tokens=32, temperature=0.8):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from nanoforge.errors import UserError


def _prompt_ids(tokenizer: Any, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, bos=tokenizer.bos_id is not None)
    else:
        ids = [int(i) for i in prompt]
    if not ids:
        raise UserError("the prompt is empty: give some text or token ids")
    return ids


@torch.no_grad()
def generate_ids(model: torch.nn.Module, prompt_ids: Sequence[int], *, max_new_tokens: int,
                 temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
                 stop_ids: Sequence[int] = ()) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids after `prompt_ids` (stops before any id in `stop_ids`).
    One forward over the prompt fills the cache; every later step feeds a single token. A prompt longer
    than `max_seq_len - max_new_tokens` keeps its newest tokens."""
    from nanoforge.model import KVCache

    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):  # nan compares false both ways
        raise UserError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k must be at least 1, got {top_k}")
    param = next(model.parameters())
    device = param.device
    limit = model.config.max_seq_len
    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise UserError("the prompt is empty: give some text or token ids")
    if min(ids) < 0 or max(ids) >= model.config.vocab_size:
        raise UserError(f"prompt token ids must lie in [0, {model.config.vocab_size}): is this the model's tokenizer?")
    # Keep the newest tokens when the prompt is longer than the model's context.
    ids = ids[-max(1, limit - max_new_tokens):]
    cache = KVCache(model.config, 1, len(ids) + max_new_tokens, device=device, dtype=param.dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    stop = set(int(i) for i in stop_ids)
    was_training = model.training
    model.eval()
    try:
        logits = model(torch.tensor([ids], device=device), cache=cache)[0, -1]
        for _ in range(max_new_tokens):
            nxt = _pick(logits, temperature, top_k, gen)
            if nxt in stop:
                return
            yield nxt
            logits = model(torch.tensor([[nxt]], device=device), cache=cache)[0, -1]
    finally:
        model.train(was_training)


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator) -> int:
    if temperature == 0.0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


def stream(model: torch.nn.Module, tokenizer: Any, prompt: str | Sequence[int], *, max_new_tokens: int,
           temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
           stop: Sequence[str] | None = None) -> Iterator[str]:
    """Yield the continuation of `prompt` in text pieces; ends at the end-of-text token, after
    `max_new_tokens`, or before the first stop string (which is not yielded)."""
    stops = [s for s in (stop or []) if s]
    # A base model ends a document by starting the next one: BOS (== EOS for our tokenizers) ends the text.
    stop_ids = [i for i in (tokenizer.eos_id, tokenizer.bos_id) if i is not None]
    out: list[int] = []
    sent = ""  # text already yielded
    for tok in generate_ids(model, _prompt_ids(tokenizer, prompt), max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, seed=seed, stop_ids=stop_ids):
        out.append(tok)
        text = tokenizer.decode(out)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
            continue
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            if cut > len(sent):
                yield text[len(sent):cut]
            return
        # hold back a tail that could be the start of a stop string
        hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        safe = len(text) - hold
        if safe > len(sent):
            yield text[len(sent):safe]
            sent = text[:safe]
    text = tokenizer.decode(out)
    if len(text) > len(sent):
        yield text[len(sent):]


def generate(model: torch.nn.Module, tokenizer: Any, prompt: str | Sequence[int], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
             stop: Sequence[str] | None = None) -> str:
    """The continuation of `prompt` (text, encoded with BOS; or token ids) as text, without the prompt.
    Greedy at temperature 0; otherwise sampled with a generator seeded by `seed` (same seed, same text)."""
    return "".join(stream(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=top_k, seed=seed, stop=stop))


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
