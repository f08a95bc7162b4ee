"""Tokenize a corpus into token shards (format in `nanoforge.data.shards`), in parallel and resumably.

    nanoforge data tokenize --corpus ~/corpus/de --tokenizer de32k --name de32k --val-docs 200 --workers 4

The corpus is cut into read units (a parquet row group, or a whole .jsonl/.json/.txt file); worker
processes encode units and the parent receives them in unit order, so document order, the train/val split
and every shard byte are the same whatever the worker count. Each shard is written atomically and records
where the stream continues after it, so a rerun after a crash skips finished shards.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from fractions import Fraction
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from nanoforge import __version__, home, progress
from nanoforge import workers as mp
from nanoforge.data import corpus as corpus_mod
from nanoforge.data import shards
from nanoforge.errors import UserError

DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB of uint16 per shard: few files, cheap to memory-map
CONFIG_FILE = "tokenize.json"

Unit = tuple[str, int]  # (file path, parquet row group or -1 for a whole file)


def _load_tokenizer(tokenizer: Any) -> Any:
    if isinstance(tokenizer, (str, os.PathLike)):
        from nanoforge.tokenizer import Tokenizer

        return Tokenizer.load(tokenizer)
    return tokenizer


def corpus_units(paths: str | os.PathLike | Sequence[str | os.PathLike], column: str = "text"
                 ) -> tuple[list[Unit], list[int], str]:
    """The read units of a corpus in order, the on-disk size of each (for MB/s progress) and the corpus
    fingerprint (names, sizes and head/tail bytes of every file). Opens every parquet footer, so a
    truncated shard or a missing column is refused before anything is written."""
    files = corpus_mod.list_files(paths)
    units: list[Unit] = []
    sizes: list[int] = []
    ident = []
    for f in files:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(65536)
            fh.seek(max(0, size - 65536))
            tail = fh.read(65536)
        ident.append([f.name, size, home.fingerprint([head.hex(), tail.hex()])])
        if f.suffix == ".parquet":
            pf = corpus_mod.parquet_file(f, column)
            for g in range(pf.num_row_groups):
                units.append((str(f), g))
                sizes.append(pf.metadata.row_group(g).total_byte_size)
            total = sum(sizes[-pf.num_row_groups:]) or 1
            for i in range(len(sizes) - pf.num_row_groups, len(sizes)):  # scale to bytes on disk
                sizes[i] = round(sizes[i] * size / total)
        else:
            units.append((str(f), -1))
            sizes.append(size)
    return units, sizes, home.fingerprint(ident)


def _read_unit(unit: Unit, column: str, split_blank_lines: bool) -> list[str]:
    path, group = unit
    if group < 0:
        return list(corpus_mod.iter_file(Path(path), column=column, split_blank_lines=split_blank_lines))
    pf = corpus_mod.parquet_file(Path(path), column)
    try:
        texts = pf.read_row_group(group, columns=[column]).column(0).to_pylist()
    except Exception as e:
        raise UserError(f"{path}: corrupt parquet data in row group {group} ({str(e).splitlines()[0]})") from None
    return [t for t in texts if t is not None]


_worker: dict[str, Any] = {}


def _init_worker(tokenizer: Any, column: str, split_blank_lines: bool, dtype: str) -> None:
    _worker.update(tok=_load_tokenizer(tokenizer), column=column, split=split_blank_lines, dtype=dtype)


def _encode_unit(unit: Unit) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(token ids, tokens per document incl. BOS, chars per document, UTF-8 bytes per document);
    empty documents are left out."""
    texts = [t for t in _read_unit(unit, _worker["column"], _worker["split"]) if t.strip()]
    ids = _worker["tok"].encode_batch(texts, bos=True, num_threads=1) if texts else []
    lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=_worker["dtype"], count=int(lens.sum()))
    chars = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    nbytes = np.fromiter((len(t.encode("utf-8")) for t in texts), dtype=np.int64, count=len(texts))
    return flat, lens, chars, nbytes


def _val_fraction(val_docs: int | None, val_fraction: float | None) -> tuple[int | None, Fraction | None]:
    if val_docs is not None and val_fraction is not None:
        raise UserError("give either --val-docs or --val-fraction, not both")
    if val_docs is not None:
        if val_docs < 0:
            raise UserError(f"--val-docs must be >= 0, got {val_docs}")
        return val_docs, None
    if val_fraction is None:
        val_fraction = 0.01
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    return None, Fraction(val_fraction).limit_denominator(1_000_000)


def is_val(doc_index: np.ndarray, val_docs: int | None, frac: Fraction | None) -> np.ndarray:
    """Which documents (global indices) go to validation: the first `val_docs`, or an evenly spread
    `frac` of them (document 0, then whenever floor(i·frac) steps up)."""
    if val_docs is not None:
        return doc_index < val_docs
    if not frac:
        return np.zeros(len(doc_index), dtype=bool)
    p, q = frac.numerator, frac.denominator
    return (doc_index == 0) | ((doc_index * p) // q > ((doc_index - 1) * p) // q)


class _SplitWriter:
    """Buffers one split's stream and writes fixed-size shards, resuming after existing ones."""

    def __init__(self, out: Path, split: str, shard_tokens: int, dtype: np.dtype) -> None:
        self.out, self.split, self.shard_tokens, self.dtype = out, split, shard_tokens, dtype
        self.index = 0
        self.written = 0  # tokens in finished shards
        self.resume = (0, 0, 0)
        for p in shards.shard_paths(out, split):
            if p.name != shards.shard_name(split, self.index):
                break
            h = shards.read_header(p)
            if h["itemsize"] != dtype.itemsize:
                raise UserError(f"token shard {p} holds {h['itemsize']}-byte ids, expected {dtype.itemsize}")
            self.index += 1
            self.written += h["count"]
            self.resume = h["resume"]
        self.skipped_shards = self.index
        self.chunks: list[np.ndarray] = []
        self.buffered = 0
        self.starts: list[np.ndarray] = []  # stream positions, chars, bytes of documents in the buffer
        self.stats: list[np.ndarray] = []
        self.unit = self.unit_start = self.skip = self.doc_base = 0
        # A small split (val) may not finish a shard for hours: its buffer is saved whenever the other
        # split writes a shard, so a resumed run need not re-read the corpus from the start.
        self.pending_path = out / f".{split}.pending.npz"
        self.next_resume = self.resume
        if self.pending_path.exists():
            with np.load(self.pending_path) as z:
                if int(z["index"]) == self.index and tuple(z["resume"].tolist()) > self.resume:
                    self.resume = self.next_resume = tuple(int(x) for x in z["resume"])
                    self.chunks, self.buffered = [z["tokens"]], len(z["tokens"])
                    self.starts, self.stats = [z["starts"]], [z["stats"]]

    def save_pending(self) -> None:
        data = np.concatenate(self.chunks) if self.chunks else np.zeros(0, self.dtype)
        starts = np.concatenate(self.starts) if self.starts else np.zeros(0, np.int64)
        stats = np.concatenate(self.stats, axis=1) if self.stats else np.zeros((2, 0), np.int64)
        self.chunks, self.starts, self.stats = [data], [starts], [stats]
        with home.atomic_path(self.pending_path) as tmp, open(tmp, "wb") as f:
            np.savez(f, index=self.index, resume=np.array(self.next_resume), tokens=data, starts=starts,
                     stats=stats)

    def add(self, unit: int, doc_base: int, n_docs: int, tokens: np.ndarray, lens: np.ndarray,
            chars: np.ndarray, nbytes: np.ndarray) -> bool:
        """Append this split's part of read unit `unit`; True when a shard was written."""
        r_unit, r_doc, r_skip = self.resume
        if unit < r_unit:
            return False
        self.next_resume = (unit + 1, doc_base + n_docs, 0)
        index = self.index
        skip = r_skip if unit == r_unit else 0
        offsets = np.concatenate([[0], np.cumsum(lens)[:-1]]) if len(lens) else lens
        keep = offsets >= skip  # documents whose start is not yet in a finished shard
        pos = self.written + self.buffered
        self.unit, self.doc_base, self.skip, self.unit_start = unit, doc_base, skip, pos
        self.chunks.append(tokens[skip:])
        self.buffered += len(tokens) - min(skip, len(tokens))
        self.starts.append(offsets[keep] - skip + pos)
        self.stats.append(np.stack([chars[keep], nbytes[keep]]))
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens, (self.unit, self.doc_base,
                                            self.skip + self.written + self.shard_tokens - self.unit_start))
        return self.index > index

    def finish(self, n_units: int, n_docs: int) -> None:
        if self.buffered:
            self._flush(self.buffered, (n_units, n_docs, 0))

    def _flush(self, n: int, resume: tuple[int, int, int]) -> None:
        data = np.concatenate(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
        starts = np.concatenate(self.starts)
        stats = np.concatenate(self.stats, axis=1)
        inside = starts < self.written + n
        chars, nbytes = (int(x) for x in stats[:, inside].sum(axis=1))
        shards.write_shard(self.out / shards.shard_name(self.split, self.index), data[:n], resume, chars, nbytes)
        self.index += 1
        self.written += n
        self.buffered -= n
        self.chunks = [data[n:]] if self.buffered else []
        self.starts, self.stats = [starts[~inside]], [stats[:, ~inside]]


def tokenize_corpus(corpus: str | os.PathLike | Sequence[str | os.PathLike], tokenizer: Any, *,
                    name: str | None = None, out: str | os.PathLike | None = None, val_docs: int | None = None,
                    val_fraction: float | None = None, workers: int | None = None, force: bool = False,
                    shard_tokens: int = DEFAULT_SHARD_TOKENS, column: str = "text",
                    split_blank_lines: bool = False) -> Path:
    """Tokenize `corpus` (a folder/files, or a corpus name under $NANOFORGE_HOME/corpora) with `tokenizer`
    (a name, a folder, or a loaded Tokenizer) into `out` (default $NANOFORGE_HOME/tokens/<name>); returns
    the folder. Validation is whole documents (`val_docs` first ones, or an evenly spread `val_fraction`,
    default 1%). An unfinished folder made with the same settings is resumed; a finished one is returned
    as is; one made with other settings (another tokenizer, corpus, split) is refused; `force` starts over."""
    if isinstance(corpus, (str, os.PathLike)):
        corpus = [home.resolve(corpus, "corpora")]
    tok = _load_tokenizer(tokenizer)
    if shard_tokens < 1:
        raise UserError(f"shard size must be at least 1 token, got {shard_tokens}")
    n_val, frac = _val_fraction(val_docs, val_fraction)
    units, sizes, corpus_fp = corpus_units(corpus, column)
    tok_name = getattr(tok, "name", None) or "tokenizer"
    if out is None:
        name = name or home.slug(f"{Path(corpus[0]).name}-{tok_name}")
        out = home.tokens_dir(name)
    out = Path(out)
    name = name or out.name
    dtype = shards.dtype_for(tok.vocab_size)
    config = {
        "tokenizer_fingerprint": tok.fingerprint, "corpus_fingerprint": corpus_fp, "units": len(units),
        "shard_tokens": shard_tokens, "dtype": dtype.name, "val_docs": n_val,
        "val_fraction": None if frac is None else float(frac), "column": column,
        "split_blank_lines": split_blank_lines,
    }
    args = (name, tok, tokenizer, config, units, sizes, corpus, n_val, frac, workers, column, split_blank_lines,
            shard_tokens, dtype)
    with home.lock(out, "token folder"):
        config_path = out / CONFIG_FILE
        if out.exists() and any(out.iterdir()):
            old = home.read_json(config_path, "tokenize settings") if config_path.exists() else None
            if old != config and not force:
                what = "another tokenizer" if old and old.get("tokenizer_fingerprint") != tok.fingerprint else \
                    "another corpus" if old and old.get("corpus_fingerprint") != corpus_fp else "other settings"
                raise UserError(f"token folder {out} exists and was made with {what}: pick another --name "
                                f"or pass --force to replace it")
            if force:
                if old is None and not (out / "meta.json").exists() and not list(out.glob("*.bin")):
                    raise UserError(f"{out} exists and is not a token folder: refusing to replace it")
                # rebuilt beside it and swapped in at the end: an interrupted rebuild keeps the old folder
                with home.atomic_dir(out, force=True, what="token folder") as tmp:
                    _tokenize_into(tmp, *args)
                return out
            if (out / "meta.json").exists():
                progress.log(f"{out} is already complete")
                return out
        return _tokenize_into(out, *args)


def _tokenize_into(out: Path, name: str, tok: Any, tokenizer: Any, config: dict, units: list[Unit],
                   sizes: list[int], corpus: Sequence, n_val: int | None, frac: Fraction | None,
                   workers: int | None, column: str, split_blank_lines: bool, shard_tokens: int,
                   dtype: np.dtype) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    home.atomic_write_json(out / CONFIG_FILE, config)

    writers = {s: _SplitWriter(out, s, shard_tokens, dtype) for s in shards.SPLITS}
    start = min(w.resume[0] for w in writers.values())
    doc_base = min((w.resume for w in writers.values()), key=lambda r: r[0])[1]
    done = sum(w.skipped_shards for w in writers.values())
    if done:
        progress.log(f"resuming {out}: {done} finished shard(s) kept, continuing at read unit {start}")
    if workers is None:
        workers = os.cpu_count() or 1
    workers = max(1, min(workers, len(units) - start)) if len(units) > start else 1
    # Workers never forked from this process (nanoforge.workers); they load the tokenizer by path when
    # there is one, else get it pickled.
    portable = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else tok
    init = (portable, column, split_blank_lines, dtype.name)
    t0, n_tokens = time.perf_counter(), 0
    bar = progress.bar(total=sum(sizes[start:]), desc=f"tokenize {name}", unit="B", unit_scale=True)
    results: Any = None
    try:
        if workers > 1:
            results = mp.imap(_encode_unit, units[start:], workers, f"tokenize {name}",
                              "the finished shards are kept, run the command again to resume",
                              initializer=_init_worker, initargs=init)
        else:
            _init_worker(*init)
            results = map(_encode_unit, units[start:])
        for u, (tokens, lens, chars, nbytes) in enumerate(results, start):
            val = is_val(np.arange(doc_base, doc_base + len(lens)), n_val, frac)
            if tokens.size and int(tokens.max()) >= tok.vocab_size:
                raise UserError(f"tokenizer produced id {int(tokens.max())} >= vocab size {tok.vocab_size}")
            for split, sel in (("train", ~val), ("val", val)):
                picked = tokens if sel.all() else tokens[np.repeat(sel, lens)]
                if writers[split].add(u, doc_base, len(lens), picked, lens[sel], chars[sel], nbytes[sel]):
                    for other in writers.values():
                        if other is not writers[split]:
                            other.save_pending()
            doc_base += len(lens)
            n_tokens += len(tokens)
            bar.update(sizes[u])
            bar.set_postfix_str(f"{n_tokens / max(time.perf_counter() - t0, 1e-9) / 1e6:.2f}M tok/s", refresh=False)
    finally:
        bar.close()
        if hasattr(results, "close"):  # stop the workers (also when interrupted or on an error)
            results.close()
    for w in writers.values():
        w.finish(len(units), doc_base)
    _finish_meta(out, name, tok, config, corpus)
    for w in writers.values():
        w.pending_path.unlink(missing_ok=True)
    return out


def _finish_meta(out: Path, name: str, tok: Any, config: dict, corpus: Sequence) -> dict:
    """Document tables and meta.json, from the shards themselves (so a resumed run counts the same)."""
    splits: dict[str, Any] = {}
    for split in shards.SPLITS:
        paths = shards.shard_paths(out, split)
        headers = [shards.read_header(p) for p in paths]
        starts = shards.scan_document_starts(paths, tok.bos_id)
        with home.atomic_path(out / f"{split}_docs.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, starts)
        splits[split] = {
            "shards": len(paths), "documents": int(len(starts)), "tokens": sum(h["count"] for h in headers),
            "chars": sum(h["chars"] for h in headers), "bytes": sum(h["bytes"] for h in headers),
        }
    total = {k: sum(s[k] for s in splits.values()) for k in ("documents", "tokens", "chars", "bytes")}
    if total["documents"] == 0 or splits["train"]["tokens"] == 0:
        import shutil
        shutil.rmtree(out, ignore_errors=True)
        if total["documents"] == 0:
            raise UserError(f"corpus {', '.join(map(str, corpus))} holds no non-empty documents")
        how = f"--val-docs {config['val_docs']}" if config["val_docs"] is not None else \
            f"--val-fraction {config['val_fraction']}"
        which = "the only document" if total["documents"] == 1 else f"all {total['documents']:,} documents"
        raise UserError(f"{which} of corpus {', '.join(map(str, corpus))} went to validation ({how}): nothing "
                        f"is left to train on; give more documents, or lower --val-docs or --val-fraction")
    tokens = max(total["tokens"], 1)
    meta = {
        "name": name, "format_version": shards.VERSION, "nanoforge_version": __version__,
        "tokenizer": {"name": getattr(tok, "name", None), "path": str(getattr(tok, "path", "") or ""),
                      "fingerprint": tok.fingerprint},
        "tokenizer_fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
        "dtype": config["dtype"], "shard_tokens": config["shard_tokens"],
        "corpus": [str(Path(c).resolve()) for c in corpus], "corpus_fingerprint": config["corpus_fingerprint"],
        "val_docs": config["val_docs"], "val_fraction": config["val_fraction"],
        **total,
        # per token of the stream the model sees (BOS included): what `nanoforge plan` multiplies by
        "chars_per_token": round(total["chars"] / tokens, 4), "bytes_per_token": round(total["bytes"] / tokens, 4),
        "splits": splits,
    }
    home.atomic_write_json(out / "meta.json", meta)
    return meta


def estimate_chars_per_token(tok: Any, texts: Sequence[str]) -> float:
    """Characters per stream token (BOS included) on a sample of documents."""
    ids = tok.encode_batch(list(texts), bos=True)
    n = sum(map(len, ids))
    return sum(map(len, texts)) / n if n else math.nan
