"""Import your own text as a standard corpus: parquet shards `shard_00000.parquet ...`, one document per
row in the column `text`, zstd-compressed, row groups of 1,024 documents (the layout of
karpathy/fineweb-edu-100b-shuffle, so everything downstream treats both the same way).

    nanoforge data import ~/letters/*.txt ~/forum.jsonl --out mine --split-blank-lines --dedup
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanoforge import __version__, home, progress
from nanoforge.data import corpus as corpus_mod
from nanoforge.errors import UserError

ROW_GROUP = 1024


def import_documents(paths: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike, *,
                     column: str = "text", split_blank_lines: bool = False, shard_chars: int = 250_000_000,
                     dedup: bool = False, force: bool = False) -> Path:
    """Read every document under `paths` (.txt: one per file, or per blank-line block with
    `split_blank_lines`; .jsonl/.json: field `column`; .parquet: column `column`), in deterministic order,
    drop empty (whitespace-only) documents and, with `dedup`, exact duplicates; write shards of about
    `shard_chars` characters to `out` (a path, or a name under $NANOFORGE_HOME/corpora) atomically, plus
    `.import.json` with the counts. Returns the folder. Refuses an existing `out` unless `force`, a corpus
    without documents, and unreadable input (nothing is written then)."""
    if shard_chars < 1:
        raise UserError(f"--shard-chars must be positive, got {shard_chars}")
    out = home.resolve(out, "corpora")
    files = corpus_mod.list_files(paths)
    seen: set[bytes] = set()
    counts = {"documents": 0, "chars": 0, "dropped_empty": 0, "dropped_duplicates": 0, "shards": 0}
    bar = progress.bar(total=len(files), desc=f"import {out.name}", unit="file")
    with home.atomic_dir(out, force=force, what="corpus folder") as tmp:
        batch: list[str] = []
        batch_chars = 0

        def flush() -> None:
            nonlocal batch, batch_chars
            path = tmp / f"shard_{counts['shards']:05d}.parquet"
            pq.write_table(pa.table({"text": pa.array(batch, type=pa.string())}), path,
                           row_group_size=ROW_GROUP, compression="zstd")
            counts["shards"] += 1
            batch, batch_chars = [], 0

        for f in files:
            for text in corpus_mod.iter_file(f, column=column, split_blank_lines=split_blank_lines):
                if not text.strip():
                    counts["dropped_empty"] += 1
                    continue
                if dedup:
                    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
                    if digest in seen:
                        counts["dropped_duplicates"] += 1
                        continue
                    seen.add(digest)
                batch.append(text)
                batch_chars += len(text)
                counts["documents"] += 1
                counts["chars"] += len(text)
                if batch_chars >= shard_chars:
                    flush()
            bar.update(1)
        bar.close()
        if batch:
            flush()
        if not counts["documents"]:
            raise UserError(f"no documents in {', '.join(map(str, paths if not isinstance(paths, (str, os.PathLike)) else [paths]))}"
                            f" ({counts['dropped_empty']} empty ones dropped)")
        home.atomic_write_json(tmp / ".import.json", {
            **counts, "sources": [str(f) for f in files], "column": column, "split_blank_lines": split_blank_lines,
            "dedup": dedup, "shard_chars": shard_chars, "nanoforge_version": __version__})
    return out
