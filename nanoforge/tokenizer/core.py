"""The one `Tokenizer` class, whatever trained it: byte-level BPE ranks + a split pattern + special tokens,
encoded by tiktoken (engine "tiktoken"), or a Hugging Face `tokenizer.json` for what tiktoken cannot express
(NFKC normalisation, prefix space, imported non-byte-level tokenizers: engine "hf").

Folder layout (no pickles anywhere):
    nanoforge.json    format, engine, pattern, special tokens, vocab size, fingerprint, training metadata
    ranks.tiktoken    one "base64(token bytes) rank" per line (tiktoken's own format)   [engine tiktoken]
    token_bytes.npy   int32 UTF-8 byte length per id, 0 for special tokens (for bits-per-byte)
    hf/               tokenizer.json + tokenizer_config.json + special_tokens_map.json (AutoTokenizer loads it)

Special-token strings inside text are ordinary text by default (`encode("<|bos|>")` gives the byte-level
pieces, never the BOS id): text scraped from the web cannot forge control tokens. Pass `parse_special=True`
to map them to their ids (chat rendering does). The HF export is set up to behave the same way.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from nanoforge.errors import UserError
from nanoforge.home import atomic_write_bytes, atomic_write_json, fingerprint, resolve

FORMAT_VERSION = 1

# nanochat's split pattern: GPT-4's, but digits in groups of at most 2 (rustbpe's default uses {1,3}).
NANOCHAT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                    r"""\s*[\r\n]|\s+(?!\S)|\s+""")
# GPT-2's pattern, which Hugging Face's ByteLevel pre-tokenizer (use_regex=True) applies.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
BOS = "<|bos|>"


class TokenizerError(UserError):
    """A tokenizer folder that is missing, broken or inconsistent."""


def write_ranks(path: str | os.PathLike, ranks: dict[bytes, int]) -> None:
    lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("ascii"))


def read_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    try:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok)] = int(rank)
                except ValueError:
                    raise TokenizerError(f"{path}: line {lineno} is not 'base64 rank'") from None
    except FileNotFoundError:
        raise TokenizerError(f"{path} is missing: not a nanoforge tokenizer folder") from None
    return ranks


def ranks_fingerprint(ranks: dict[bytes, int], pattern: str | None, special_tokens: dict[str, int]) -> str:
    """Hash of what decides the ids: every (token, rank), the pattern and the special tokens."""
    blob = b"".join(base64.b64encode(t) + b"%d;" % r for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))
    return fingerprint({"ranks": fingerprint(blob.decode("ascii")), "pattern": pattern, "special": special_tokens})


class Tokenizer:
    """Byte-level BPE tokenizer. Build with `Tokenizer.from_ranks(...)` or `Tokenizer.load(name_or_path)`."""

    def __init__(self, *, meta: dict[str, Any], ranks: dict[bytes, int] | None = None,
                 hf_json: str | None = None, path: Path | None = None):
        self.meta = meta
        self.engine: str = meta["engine"]
        self.pattern: str | None = meta.get("pattern")
        self.special_tokens: dict[str, int] = dict(meta["special_tokens"])
        self.vocab_size: int = int(meta["vocab_size"])
        self.name: str = meta.get("name") or (path.name if path else "tokenizer")
        self.path = path
        self._ranks = ranks
        self._hf_json = hf_json
        self.fingerprint: str = meta["fingerprint"]
        bos = meta.get("bos", BOS if BOS in self.special_tokens else None)
        self.bos_id: int | None = self.special_tokens.get(bos) if bos else None
        eos = meta.get("eos", bos)
        self.eos_id: int | None = self.special_tokens.get(eos) if eos else self.bos_id
        if self.engine == "tiktoken":
            import tiktoken

            if ranks is None:
                raise TokenizerError("a tiktoken-engine tokenizer needs its ranks")
            self._enc = tiktoken.Encoding(name=self.name, pat_str=self.pattern, mergeable_ranks=ranks,
                                          special_tokens=self.special_tokens)
        elif self.engine == "hf":
            from tokenizers import Tokenizer as HFTokenizer

            if hf_json is None:
                raise TokenizerError("an hf-engine tokenizer needs its tokenizer.json")
            self._hf = HFTokenizer.from_str(hf_json)
            self._hf.no_padding()
            self._hf.no_truncation()
            self._hf_parse = HFTokenizer.from_str(hf_json)
            self._hf_parse.no_padding()
            self._hf_parse.no_truncation()
            self._hf.encode_special_tokens = True  # special strings are text by default
        else:
            raise TokenizerError(f"unknown tokenizer engine {self.engine!r} (expected tiktoken or hf)")

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_ranks(cls, ranks: dict[bytes, int], pattern: str, special_tokens: Sequence[str] | dict[str, int],
                   *, name: str = "tokenizer", training: dict[str, Any] | None = None,
                   engine: str = "tiktoken", hf_json: str | None = None) -> Tokenizer:
        """A tokenizer from byte-level ranks; special tokens given as names get the ids after the ranks."""
        if not isinstance(special_tokens, dict):
            base = max(ranks.values()) + 1
            special_tokens = {s: base + i for i, s in enumerate(special_tokens)}
        vocab_size = max([*ranks.values(), *special_tokens.values()]) + 1
        meta = {"format": FORMAT_VERSION, "name": name, "engine": engine, "pattern": pattern,
                "special_tokens": special_tokens, "vocab_size": vocab_size,
                "bos": BOS if BOS in special_tokens else None,
                "fingerprint": ranks_fingerprint(ranks, pattern, special_tokens), "training": training or {}}
        return cls(meta=meta, ranks=ranks, hf_json=hf_json)

    @classmethod
    def from_hf_json(cls, hf_json: str, *, name: str, bos: str | None = None, eos: str | None = None,
                     training: dict[str, Any] | None = None) -> Tokenizer:
        """A tokenizer encoded by Hugging Face tokenizers (NFKC recipes, imported tokenizers)."""
        from tokenizers import Tokenizer as HFTokenizer

        hf = HFTokenizer.from_str(hf_json)
        special = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        meta = {"format": FORMAT_VERSION, "name": name, "engine": "hf", "pattern": None,
                "special_tokens": special, "vocab_size": hf.get_vocab_size(with_added_tokens=True),
                "bos": bos, "eos": eos, "fingerprint": fingerprint(hf_json), "training": training or {}}
        return cls(meta=meta, hf_json=hf_json)

    @classmethod
    def load(cls, name_or_path: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer folder (a path, or a name under $NANOFORGE_HOME/tokenizers). Refuses a folder whose
        stored fingerprint or pattern does not match its contents."""
        path = resolve(name_or_path, "tokenizers")
        if not (path / "nanoforge.json").is_file():
            raise TokenizerError(f"no tokenizer at {path} (missing nanoforge.json; train one with "
                                 "`nanoforge tokenizer train` or import one with `nanoforge tokenizer import-hf`)")
        try:
            meta = json.loads((path / "nanoforge.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{path / 'nanoforge.json'} is not valid JSON: {e}") from None
        if meta.get("format") != FORMAT_VERSION:
            raise TokenizerError(f"{path}: unsupported tokenizer format {meta.get('format')!r}")
        meta.setdefault("name", path.name)
        if meta["engine"] == "tiktoken":
            ranks = read_ranks(path / "ranks.tiktoken")
            fp = ranks_fingerprint(ranks, meta.get("pattern"), meta["special_tokens"])
            if fp != meta["fingerprint"]:
                raise TokenizerError(f"{path}: ranks.tiktoken or the pattern do not match the stored fingerprint "
                                     f"({fp} != {meta['fingerprint']}); the folder was modified")
            tok = cls(meta=meta, ranks=ranks, path=path)
        else:
            hf_file = path / "hf" / "tokenizer.json"
            if not hf_file.is_file():
                raise TokenizerError(f"{hf_file} is missing")
            hf_json = hf_file.read_text(encoding="utf-8")
            if fingerprint(hf_json) != meta["fingerprint"]:
                raise TokenizerError(f"{path}: hf/tokenizer.json does not match the stored fingerprint")
            tok = cls(meta=meta, hf_json=hf_json, path=path)
        return tok

    def save(self, folder: str | os.PathLike) -> Path:
        """Write nanoforge.json, ranks.tiktoken (tiktoken engine) and token_bytes.npy into `folder`. The
        Hugging Face files (hf/) are `tokenizer.hf.export_hf`'s job: this module knows nothing of that format."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = dict(self.meta, name=self.name)
        if self.engine == "tiktoken":
            write_ranks(folder / "ranks.tiktoken", self._ranks)
        with open(folder / ".token_bytes.npy.tmp", "wb") as f:
            np.save(f, self.token_bytes)
        os.replace(folder / ".token_bytes.npy.tmp", folder / "token_bytes.npy")
        atomic_write_json(folder / "nanoforge.json", meta)
        return folder

    # ---- encoding ----------------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = False, *, parse_special: bool = False) -> list[int]:
        """Token ids of `text`; `bos=True` prepends `<|bos|>`. Special-token strings are text unless
        `parse_special`."""
        if self.engine == "tiktoken":
            ids = self._enc.encode(text, allowed_special="all") if parse_special else self._enc.encode_ordinary(text)
        else:
            hf = self._hf_parse if parse_special else self._hf
            ids = hf.encode(text, add_special_tokens=False).ids
        return [self._require_bos(), *ids] if bos else ids

    def encode_batch(self, texts: Sequence[str], bos: bool = False, num_threads: int | None = None,
                     *, parse_special: bool = False) -> list[list[int]]:
        """`encode` over many texts, in threads (tiktoken and HF tokenizers release the GIL)."""
        texts = list(texts)
        if self.engine == "tiktoken":
            n = num_threads or os.cpu_count() or 1
            if parse_special:
                out = self._enc.encode_batch(texts, num_threads=n, allowed_special="all")
            else:
                out = self._enc.encode_ordinary_batch(texts, num_threads=n)
        else:
            hf = self._hf_parse if parse_special else self._hf
            out = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
        if bos:
            b = self._require_bos()
            for ids in out:
                ids.insert(0, b)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (special tokens render as their strings; invalid UTF-8 becomes U+FFFD)."""
        ids = [int(i) for i in ids]
        if self.engine == "tiktoken":
            return self._enc.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=False)

    # ---- chat (nanoforge/tokenizer/chat.py) -----------------------------------------------------------
    def render_conversation(self, conv: Any, max_tokens: int | None = None, *, source: str | None = None):
        """`(ids, mask)` of a conversation, as a `chat.Rendered` (also has `.truncated`); see tokenizer/chat.py."""
        from nanoforge.tokenizer.chat import render_conversation

        return render_conversation(self, conv, max_tokens, source=source)

    def render_for_completion(self, conv: Any, *, source: str | None = None) -> list[int]:
        """Prompt ids for generation: drops a final assistant turn, ends with `<|assistant_start|>`."""
        from nanoforge.tokenizer.chat import render_for_completion

        return render_for_completion(self, conv, source=source)

    def special_id(self, name: str) -> int:
        try:
            return self.special_tokens[name]
        except KeyError:
            raise TokenizerError(f"tokenizer {self.name} has no special token {name!r} "
                                 f"(it has: {', '.join(self.special_tokens) or 'none'})") from None

    def _require_bos(self) -> int:
        if self.bos_id is None:
            raise TokenizerError(f"tokenizer {self.name} has no BOS token")
        return self.bos_id

    # ---- per-id data -------------------------------------------------------------------------------
    def id_bytes(self, i: int) -> bytes:
        """The bytes token `i` stands for (b"" for special tokens)."""
        return self._id_to_bytes.get(i, b"")

    @cached_property
    def _id_to_bytes(self) -> dict[int, bytes]:
        if self.engine == "tiktoken":
            return {r: t for t, r in self._ranks.items()}
        special = set(self.special_tokens.values())
        out: dict[int, bytes] = {}
        vocab = self._hf.get_vocab(with_added_tokens=True)
        byte_level = "ByteLevel" in json.dumps(json.loads(self._hf_json).get("decoder"))
        inv = _unicode_to_byte() if byte_level else None
        for piece, i in vocab.items():
            if i in special:
                continue
            if inv is not None and all(c in inv for c in piece):
                out[i] = bytes(inv[c] for c in piece)
            else:  # other vocabularies (SentencePiece-style): the decoded text of the id on its own
                out[i] = self._hf.decode([i]).encode("utf-8")
        return out

    @cached_property
    def token_bytes(self) -> np.ndarray:
        """int32 [vocab_size]: UTF-8 bytes per id, 0 for special tokens (bits-per-byte divides by these)."""
        arr = np.zeros(self.vocab_size, dtype=np.int32)
        special = set(self.special_tokens.values())
        for i, b in self._id_to_bytes.items():
            if i < self.vocab_size and i not in special:
                arr[i] = len(b)
        return arr

    @property
    def ranks(self) -> dict[bytes, int] | None:
        return self._ranks

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, engine={self.engine!r})"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel pre-tokenizers use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}
