"""Train a tokenizer from a corpus: `train_tokenizer(data, vocab_size=..., backend=..., name=...)`.

Backends (all byte-level BPE, `vocab_size` counts the 9 special tokens, which get the last ids):
  rustbpe  nanochat's recipe: rustbpe trains with nanochat's split pattern (passed explicitly, rustbpe's own
           default splits digits in threes), tiktoken encodes.
  neox     Hugging Face tokenizers ByteLevel BPE (GPT-2 split pattern), lossless: all 256 bytes are in the
           initial alphabet, no NFKC, no prefix space. `neox_compat=True` is GPT-NeoX's exact recipe (NFKC,
           prefix space, unseen bytes dropped), encoded by HF tokenizers because tiktoken cannot normalise.
  python   our own trainer (nanoforge.tokenizer.bpe): the same merges as rustbpe.

Documents stream through `nanoforge.data.corpus`, with nanochat's tok_train limits: each document is cut to
`doc_cap` characters, and reading stops once more than `max_chars` characters were taken.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from nanoforge import __version__, progress
from nanoforge.data.corpus import iter_file, list_files
from nanoforge.errors import UserError
from nanoforge.home import atomic_dir, lock, tokenizer_dir
from nanoforge.tokenizer.core import (
    BOS,
    GPT2_PATTERN,
    NANOCHAT_PATTERN,
    SPECIAL_TOKENS,
    Tokenizer,
    bytes_to_unicode,
)
from nanoforge.tokenizer.hf import export_hf

BACKENDS = ("rustbpe", "neox", "python")
DEFAULT_VOCAB_SIZE = 65_536


class _Stats:
    docs = 0
    chars = 0


def iter_training_texts(data: str | os.PathLike | Sequence[str | os.PathLike], *, max_chars: int | None = None,
                        doc_cap: int | None = None, stats: _Stats | None = None) -> Iterator[str]:
    """Documents for training, each cut to `doc_cap` characters, stopping after more than `max_chars`."""
    files = list_files(data)
    stats = stats if stats is not None else _Stats()
    for k, path in enumerate(files, 1):
        progress.log(f"reading shard {k}/{len(files)}: {path}")
        for text in iter_file(path):
            if doc_cap is not None and len(text) > doc_cap:
                text = text[:doc_cap]
            stats.docs += 1
            stats.chars += len(text)
            yield text
            if max_chars is not None and stats.chars > max_chars:
                return


def _check(vocab_size: int, backend: str, max_chars: int | None, doc_cap: int | None) -> None:
    if backend not in BACKENDS:
        raise UserError(f"unknown tokenizer backend {backend!r} (choose one of: {', '.join(BACKENDS)})")
    minimum = 256 + len(SPECIAL_TOKENS) + 1
    if vocab_size < minimum:
        raise UserError(f"vocab size {vocab_size} is too small: 256 byte tokens + {len(SPECIAL_TOKENS)} special "
                        f"tokens need at least {minimum}")
    if vocab_size >= 1 << 20:
        raise UserError(f"vocab size {vocab_size} is too large (at most {(1 << 20) - 1})")
    for flag, v in (("--max-chars", max_chars), ("--doc-cap", doc_cap)):
        if v is not None and v <= 0:
            raise UserError(f"{flag} must be positive, got {v}")


def train_tokenizer(data: str | os.PathLike | Sequence[str | os.PathLike], *, vocab_size: int = DEFAULT_VOCAB_SIZE,
                    backend: str = "rustbpe", name: str | None = None, out: str | os.PathLike | None = None,
                    max_chars: int | None = None, doc_cap: int | None = None, force: bool = False,
                    neox_compat: bool = False) -> Path:
    """Train on the documents under `data`, save to `out` (or $NANOFORGE_HOME/tokenizers/<name>) and return
    the folder. Refuses an existing folder unless `force`; an interrupted run leaves nothing behind."""
    _check(vocab_size, backend, max_chars, doc_cap)
    if out is None and not name:
        raise UserError("give the tokenizer a --name (or an --out folder)")
    dest = Path(out) if out is not None else tokenizer_dir(name)
    name = name or dest.name
    with lock(dest, "tokenizer"):  # held from the start: a second training of this name stops now
        if dest.exists() and not force:
            raise UserError(f"tokenizer {dest} already exists (use --force to replace it)")
        list_files(data)  # fail fast on a missing or empty data path
        progress.log(f"training a {backend} tokenizer with vocab size {vocab_size:,}")
        stats = _Stats()
        texts = iter_training_texts(data, max_chars=max_chars, doc_cap=doc_cap, stats=stats)
        t0 = time.perf_counter()
        with atomic_dir(dest, force=force, what="tokenizer") as tmp:
            if backend == "rustbpe":
                tok_args = _train_rustbpe(texts, vocab_size)
            elif backend == "python":
                tok_args = _train_python(texts, vocab_size)
            else:
                tok_args = _train_neox(texts, vocab_size, compat=neox_compat)
            seconds = time.perf_counter() - t0
            if stats.chars == 0:
                raise UserError(f"no text in {data}: every document is empty")
            training = {"backend": backend, "vocab_size": vocab_size, "neox_compat": neox_compat if backend == "neox" else None,
                        "data": [str(p) for p in list_files(data)], "max_chars": max_chars, "doc_cap": doc_cap,
                        "documents": stats.docs, "characters": stats.chars, "seconds": round(seconds, 3),
                        "nanoforge_version": __version__}
            tok = _build(tok_args, name=name, training=training)
            tok.save(tmp)
            export_hf(tok, tmp / "hf")
        progress.log(f"trained in {seconds:.2f}s on {stats.docs:,} documents ({stats.chars:,} characters)")
        progress.log(f"final vocab size: {tok.vocab_size:,}")
        progress.log(f"saved tokenizer to {dest}")
        return dest


def _build(args: dict[str, Any], *, name: str, training: dict[str, Any]) -> Tokenizer:
    if "hf_json" in args and args.get("engine") == "hf":
        from nanoforge.tokenizer.hf import with_bos_post_processor

        hf_json = with_bos_post_processor(args["hf_json"], BOS, args["bos_id"])
        return Tokenizer.from_hf_json(hf_json, name=name, bos=BOS, eos=BOS, training=training)
    return Tokenizer.from_ranks(args["ranks"], args["pattern"], SPECIAL_TOKENS, name=name, training=training)


def _train_rustbpe(texts: Iterator[str], vocab_size: int) -> dict[str, Any]:
    import rustbpe

    r = rustbpe.Tokenizer()
    r.train_from_iterator(texts, vocab_size - len(SPECIAL_TOKENS), pattern=NANOCHAT_PATTERN)
    ranks = {bytes(b): i for b, i in r.get_mergeable_ranks()}
    return {"ranks": ranks, "pattern": NANOCHAT_PATTERN}


def _train_python(texts: Iterator[str], vocab_size: int) -> dict[str, Any]:
    from nanoforge.tokenizer.bpe import count_chunks, merges_to_ranks, train_bpe

    counts = count_chunks(texts, NANOCHAT_PATTERN)
    merges = train_bpe(counts, vocab_size - len(SPECIAL_TOKENS) - 256)
    return {"ranks": merges_to_ranks(merges), "pattern": NANOCHAT_PATTERN}


def _train_neox(texts: Iterator[str], vocab_size: int, *, compat: bool) -> dict[str, Any]:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    if compat:  # GPT-NeoX's train_tokenizer.py: NFKC, prefix space, alphabet = bytes seen in training
        hf.normalizer = normalizers.NFKC()
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
        hf.train_from_iterator(texts, trainer)
        hf.add_special_tokens(SPECIAL_TOKENS)
        return {"engine": "hf", "hf_json": hf.to_str(), "bos_id": hf.token_to_id(BOS)}
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer)
    # Byte-level pieces -> bytes; a merge's result gets rank = its id, which reproduces HF's ids in tiktoken
    # (checked in the tests on the hard test set and real text).
    u2b = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes(u2b[ch] for ch in piece): i for piece, i in hf.get_vocab().items()}
    return {"ranks": ranks, "pattern": GPT2_PATTERN}
