"""Reading documents from a corpus: parquet shards (one document per row, column `text`, the layout of
karpathy/fineweb-edu-100b-shuffle), `.jsonl`/`.json` files (a field per line) and `.txt` files (one
document per file, or per blank-line-separated block). Streams row group by row group, so a corpus
never has to fit in memory. Every problem with the input becomes a one-line UserError naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanoforge.errors import UserError

DOCUMENT_SUFFIXES = (".parquet", ".jsonl", ".json", ".txt")


def list_files(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The document files named by `paths` (files, or folders searched recursively), sorted by path
    within each folder so the order is deterministic. Refuses a missing path or an empty result."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"data path {p} does not exist")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in DOCUMENT_SUFFIXES
                           and not f.name.startswith("."))
            if not found:
                raise UserError(f"data folder {p} holds no .parquet, .jsonl, .json or .txt files")
            files.extend(found)
        elif p.suffix in DOCUMENT_SUFFIXES:
            files.append(p)
        else:
            raise UserError(f"{p}: unsupported file type {p.suffix!r} (expected .parquet, .jsonl, .json or .txt)")
    return files


def parquet_file(path: Path, column: str = "text") -> pq.ParquetFile:
    """Open a parquet shard and check that it has a string `column`; one-line errors otherwise."""
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for truncated or foreign files
        raise UserError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise UserError(f"{path}: no column {column!r} (columns: {', '.join(names) or 'none'})")
    kind = pf.schema_arrow.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)
            or str(kind) == "string_view"):
        raise UserError(f"{path}: column {column!r} holds {kind}, not text (strings); "
                        f"pick the text column with --column")
    return pf


def iter_parquet(path: Path, column: str = "text") -> Iterator[str]:
    pf = parquet_file(path, column)
    try:
        for i in range(pf.num_row_groups):
            for text in pf.read_row_group(i, columns=[column]).column(0).to_pylist():
                if text is not None:
                    yield text
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: corrupt parquet data ({str(e).splitlines()[0]})") from None


def iter_jsonl(path: Path, field: str = "text") -> Iterator[str]:
    """Documents from a `.jsonl` file (one object per line) or a `.json` file (a list of objects or strings)."""
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            rows = data if isinstance(data, list) else [data]
            for i, row in enumerate(rows):
                yield _field(row, field, path, i + 1, "item")
            return
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:  # its position is within the line
                        raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
                    yield _field(row, field, path, lineno, "line")
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _field(row: object, field: str, path: Path, n: int, unit: str) -> str:
    if isinstance(row, str):
        return row
    if not isinstance(row, dict) or field not in row:
        raise UserError(f"{path}: {unit} {n} has no field {field!r}")
    value = row[field]
    if not isinstance(value, str):
        raise UserError(f"{path}: {unit} {n} field {field!r} is not a string")
    return value


def iter_txt(path: Path, split_blank_lines: bool = False) -> Iterator[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not split_blank_lines:
        yield text
        return
    block: list[str] = []
    for line in text.splitlines(keepends=True):
        if line.strip():
            block.append(line)
        elif block:
            yield "".join(block).rstrip("\n")
            block = []
    if block:
        yield "".join(block).rstrip("\n")


def iter_file(path: Path, *, column: str = "text", split_blank_lines: bool = False) -> Iterator[str]:
    """Documents of one file; `column` is the parquet column or JSON field."""
    if path.suffix == ".parquet":
        return iter_parquet(path, column)
    if path.suffix in (".jsonl", ".json"):
        return iter_jsonl(path, column)
    return iter_txt(path, split_blank_lines)


def iter_documents(paths: str | os.PathLike | Sequence[str | os.PathLike], *, column: str = "text",
                   split_blank_lines: bool = False) -> Iterator[str]:
    """Every document under `paths`, in deterministic order (see `list_files`)."""
    for path in list_files(paths):
        yield from iter_file(path, column=column, split_blank_lines=split_blank_lines)
