"""Chinchilla-style data planning: how much text a model of N parameters should see.

    nanoforge plan --params 156M --params 561M --params 1.5B

tokens = ratio · N (20 tokens per parameter), characters = tokens · chars/token (measured with your
tokenizer on your corpus, else 4.8, fineweb-edu with a 65k nanochat tokenizer), shards = characters /
chars per shard (measured on your corpus, else 250M, karpathy/fineweb-edu-100b-shuffle), FLOPs = 6 · N · D.
"""

from __future__ import annotations

import math
import os
from typing import Any

from nanoforge.errors import UserError

DEFAULT_CHARS_PER_TOKEN = 4.8
DEFAULT_CHARS_PER_SHARD = 250_000_000
SAMPLE_CHARS = 2_000_000  # enough for chars/token to three digits


def human(n: float, decimals: int = 1) -> str:
    """156M, 3.1B, 1.5T: `decimals` after the point, a trailing .0 dropped."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            s = f"{n / scale:.{decimals}f}"
            return (s.rstrip("0").rstrip(".") if "." in s else s) + unit
    return f"{n:.{decimals}f}".rstrip("0").rstrip(".")


def make_plan(models: list[tuple[str, int]], *, ratio: float = 20.0, chars_per_token: float | None = None,
              chars_per_shard: float | None = None) -> dict[str, Any]:
    """One row per (label, parameter count): tokens, characters, shards (rounded up) and training FLOPs.
    Refuses (UserError) a count or ratio that is not a positive finite number."""
    for what, value in (("--ratio", ratio), ("--chars-per-token", chars_per_token),
                        ("--chars-per-shard", chars_per_shard), *(("--params", p) for _, p in models)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UserError(f"{what} must be a positive number, got {value:g}")
    cpt = DEFAULT_CHARS_PER_TOKEN if chars_per_token is None else chars_per_token
    cps = DEFAULT_CHARS_PER_SHARD if chars_per_shard is None else chars_per_shard
    rows = []
    for label, params in models:
        tokens = ratio * params
        chars = tokens * cpt
        rows.append({"model": label, "params": int(params), "tokens": int(round(tokens)),
                     "chars": int(round(chars)), "shards": math.ceil(chars / cps - 1e-9),
                     "flops": 6.0 * params * tokens})
    return {"ratio": ratio, "chars_per_token": cpt, "chars_per_shard": cps, "rows": rows}


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as a markdown table."""
    cpt, cps = plan["chars_per_token"], plan["chars_per_shard"]
    lines = [f"| model | params | tokens ({plan['ratio']:g}/param) | chars ({cpt:.3g}/token) | "
             f"shards ({_short(cps)} chars) | FLOPs (6ND) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in plan["rows"]:
        chars = r["chars"]
        lines.append(f"| {r['model']} | {human(r['params'])} | {human(r['tokens'])} | "
                     f"{_short(chars)} | {r['shards']:,} | "
                     f"{r['flops']:.2g} |")
    return "\n".join(lines) + "\n"


def _short(n: float) -> str:
    """Whole units from 10 up (15B, 144B, 250M), one decimal below (5.6M)."""
    scale = next((s for s in (1e12, 1e9, 1e6, 1e3) if n >= s), 1.0)
    return human(n, 0 if n / scale >= 10 else 1)


def measure(corpus: str | os.PathLike, tokenizer: str | None = None) -> dict[str, Any]:
    """Characters per shard of `corpus` (mean over its first two files, read in full) and, with a
    tokenizer, characters per token (BOS included) on the first ~2M characters."""
    from nanoforge import home
    from nanoforge.data import corpus as corpus_mod

    files = corpus_mod.list_files(home.resolve(corpus, "corpora"))
    sample: list[str] = []
    sampled = 0
    per_file = []
    for f in files[:2]:
        n = 0
        for text in corpus_mod.iter_file(f):
            n += len(text)
            if sampled < SAMPLE_CHARS and text.strip():
                sample.append(text[:SAMPLE_CHARS])
                sampled += len(sample[-1])
        per_file.append(n)
    out: dict[str, Any] = {"corpus": str(corpus), "files": len(files),
                           "chars_per_shard": sum(per_file) / len(per_file) if per_file else None}
    if tokenizer:
        from nanoforge.data.tokenize import _load_tokenizer, estimate_chars_per_token

        out["tokenizer"] = tokenizer
        out["chars_per_token"] = estimate_chars_per_token(_load_tokenizer(tokenizer), sample)
    return out
