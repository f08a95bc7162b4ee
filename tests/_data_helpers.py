"""Helpers for the data tests: small corpora written on the fly and a byte-level stand-in tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


class ByteTokenizer:
    """The Tokenizer interface the data stage uses, over UTF-8 bytes: ids 0-255, `<|bos|>` = 256."""

    name = "bytes"
    path = None
    vocab_size = 257
    bos_id = eos_id = 256
    fingerprint = "bytes-stand-in-01"
    token_bytes = np.array([1] * 256 + [0], dtype=np.int32)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return ([self.bos_id] if bos else []) + list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str], bos: bool = False, num_threads: int | None = None) -> list[list[int]]:
        return [self.encode(t, bos) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def documents(n: int, seed: int = 0) -> list[str]:
    """`n` documents of varied length (1 to ~300 chars), each unique and tagged with its index."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "Äpfel", "über", "naïve", "x", "ℝ", "zeta"]
    return [f"doc{i} " + " ".join(rng.choice(words, size=int(rng.integers(0, 60)))) for i in range(n)]


def write_parquet(path: Path, texts: list[str | None], row_group_size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), path, row_group_size=row_group_size)
    return path


def make_corpus(folder: Path, n_docs: int = 200, files: int = 2, row_group_size: int = 16, seed: int = 0) -> Path:
    docs = documents(n_docs, seed)
    per = -(-n_docs // files)
    for f in range(files):
        write_parquet(folder / f"shard_{f:05d}.parquet", docs[f * per:(f + 1) * per], row_group_size)
    return folder
