"""Token shards: the on-disk format between `data tokenize` and the loader.

    tokens/<name>/train_00000.bin ...  val_00000.bin ...  train_docs.npy  val_docs.npy  meta.json

A shard is a 64-byte little-endian header followed by `count` token ids:

    offset  size  field
    0       8     magic b"NFTOKENS"
    8       4     version (uint32, 1)
    12      4     itemsize (uint32: 2 = uint16 ids, 4 = uint32 ids)
    16      8     count (uint64, tokens in this shard)
    24      8     resume_unit (uint64)  } where `data tokenize` continues after this shard
    32      8     resume_doc (uint64)   } (read unit, global document index at its start,
    40      8     resume_skip (uint64)  }  tokens of this split from that unit already written)
    48      8     chars (uint64)  } characters and UTF-8 bytes of the documents that start in this
    56      8     bytes (uint64)  } shard (summed into meta.json; survive a resumed run)

Documents are `<|bos|> tokens...` concatenated; a document may continue into the next shard. Every shard
of a split except the last holds exactly `meta["shard_tokens"]` ids. `<split>_docs.npy` holds the int64
offset of every document start in the split's token stream (the loader's document table).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from nanoforge import home
from nanoforge.errors import UserError

MAGIC = b"NFTOKENS"
VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIQQQQQQ")
assert _HEADER.size == HEADER_SIZE
SPLITS = ("train", "val")


def dtype_for(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65,536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.bin"


def encode_header(itemsize: int, count: int, resume: tuple[int, int, int] = (0, 0, 0), chars: int = 0,
                  nbytes: int = 0) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, itemsize, count, *resume, chars, nbytes)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The header of a shard, checked against the file size; one-line UserError for a foreign,
    truncated or padded file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
        size = path.stat().st_size
    except FileNotFoundError:
        raise UserError(f"token shard {path} does not exist") from None
    if len(raw) < HEADER_SIZE:
        raise UserError(f"token shard {path}: only {len(raw)} bytes, shorter than the {HEADER_SIZE}-byte header "
                        f"(truncated: delete it and rerun `nanoforge data tokenize` to redo it)")
    magic, version, itemsize, count, unit, doc, skip, chars, nbytes = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise UserError(f"{path} is not a nanoforge token shard (magic {magic!r})")
    if version != VERSION:
        raise UserError(f"token shard {path} has format version {version}; this nanoforge reads {VERSION}")
    if itemsize not in (2, 4):
        raise UserError(f"token shard {path}: bad id size {itemsize} in header")
    expected = HEADER_SIZE + count * itemsize
    if size != expected:
        raise UserError(f"token shard {path}: header says {count:,} tokens ({expected:,} bytes) but the file has "
                        f"{size:,} bytes (truncated or corrupt: delete it and rerun `nanoforge data tokenize`)")
    return {"itemsize": itemsize, "count": count, "resume": (unit, doc, skip), "chars": chars, "bytes": nbytes}


def write_shard(path: str | os.PathLike, tokens: np.ndarray, resume: tuple[int, int, int] = (0, 0, 0),
                chars: int = 0, nbytes: int = 0) -> None:
    """Write one shard atomically (temporary file, then rename)."""
    tokens = np.ascontiguousarray(tokens)
    with home.atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(encode_header(tokens.dtype.itemsize, len(tokens), resume, chars, nbytes))
        f.write(tokens.astype(tokens.dtype.newbyteorder("<"), copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())


def open_shard(path: str | os.PathLike) -> np.ndarray:
    """The token ids of a shard as a read-only memory map (header checked)."""
    h = read_header(path)
    if h["count"] == 0:
        return np.zeros(0, dtype=np.uint16 if h["itemsize"] == 2 else np.uint32)
    dtype = np.dtype("<u2") if h["itemsize"] == 2 else np.dtype("<u4")
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(h["count"],))


def shard_paths(tokens_dir: str | os.PathLike, split: str) -> list[Path]:
    """`<split>_00000.bin ...` in order."""
    return sorted(Path(tokens_dir).glob(f"{split}_[0-9][0-9][0-9][0-9][0-9].bin"))


def read_meta(tokens_dir: str | os.PathLike, tokenizer_fingerprint: str | None = None) -> dict[str, Any]:
    """meta.json of a finished token folder (a name under $NANOFORGE_HOME/tokens or a path). Refuses an
    unfinished folder, and shards made by another tokenizer when `tokenizer_fingerprint` is given."""
    d = home.resolve(tokens_dir, "tokens")
    if not d.is_dir():
        raise UserError(f"token folder {d} does not exist (make it with `nanoforge data tokenize`)")
    meta_path = d / "meta.json"
    if not meta_path.exists():
        raise UserError(f"token folder {d} is unfinished (no meta.json): rerun `nanoforge data tokenize` "
                        f"with the same arguments to resume it")
    meta = home.read_json(meta_path, "token metadata")
    meta["path"] = str(d)
    if tokenizer_fingerprint is not None and meta.get("tokenizer_fingerprint") != tokenizer_fingerprint:
        raise UserError(f"token folder {d} was made by tokenizer {meta.get('tokenizer', {}).get('name')!r} "
                        f"(fingerprint {meta.get('tokenizer_fingerprint')}), not the requested one "
                        f"(fingerprint {tokenizer_fingerprint}): retokenize with `nanoforge data tokenize`")
    return meta


def document_starts(tokens_dir: str | os.PathLike, split: str, bos_id: int) -> np.ndarray:
    """int64 offsets of every document start in the split's stream: `<split>_docs.npy` when present,
    else found by scanning the shards for `<|bos|>`."""
    d = Path(tokens_dir)
    cached = d / f"{split}_docs.npy"
    if not cached.exists():
        return scan_document_starts(shard_paths(d, split), bos_id)
    fix = "rebuild the folder with `nanoforge data tokenize ... --force`"
    try:
        starts = np.load(cached, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"document table {cached} is not readable ({str(e).splitlines()[0][:80]}); {fix}") from None
    total = sum(read_header(p)["count"] for p in shard_paths(d, split))
    if starts.ndim != 1 or starts.dtype.kind not in "iu" or (len(starts) and (
            int(starts[0]) != 0 or int(starts[-1]) >= total or bool(np.any(np.diff(starts) <= 0)))):
        raise UserError(f"document table {cached} does not fit the {split} shards ({total:,} tokens): "
                        f"offsets must rise from 0 below the token count; {fix}")
    return starts.astype(np.int64, copy=False)


def scan_document_starts(paths: list[Path], bos_id: int) -> np.ndarray:
    starts, base = [], 0
    for p in paths:
        ids = open_shard(p)
        starts.append(np.flatnonzero(ids == bos_id).astype(np.int64) + base)
        base += len(ids)
    return np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
