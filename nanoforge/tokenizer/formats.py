"""Importing tokenizers saved in other projects' formats (Hugging Face imports live in hf.py).

nanochat saves its tokenizer as `tokenizer.pkl`, a pickled tiktoken Encoding. Plain unpickling runs
whatever code the file names, so we never do it: `read_tiktoken_pickle` uses an unpickler that knows one
class, a stand-in for `tiktoken.core.Encoding` that only keeps the state it is given (name, pattern,
ranks, specials), and refuses every other global. A pickle that would call anything else fails before
anything runs. The result is stored in our own pickle-free format.

A tiktoken rank file (`*.tiktoken`: "base64 rank" per line, as Qwen and OpenAI publish them) carries no
pattern or special tokens: `import_tiktoken` takes them as arguments and appends our chat specials that
the file lacks, so the tokenizer can be trained on and chatted with.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nanoforge.errors import UserError
from nanoforge.home import atomic_dir, tokenizer_dir
from nanoforge.tokenizer.core import NANOCHAT_PATTERN, SPECIAL_TOKENS, Tokenizer, TokenizerError, read_ranks
from nanoforge.tokenizer.hf import export_hf

# Split patterns of published tokenizers, by the names `--pattern` accepts.
PATTERNS = {
    "nanochat": NANOCHAT_PATTERN,
    # cl100k_base / GPT-4; Qwen2 and Qwen2.5 use the same pattern with \p{N} (single digits).
    "cl100k": (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|"""
               r"""\s++$|\s*[\r\n]|\s+(?!\S)|\s"""),
    "qwen2": (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
              r"""\s*[\r\n]+|\s+(?!\S)|\s+"""),
}


class _Encoding:
    """Stand-in for tiktoken.core.Encoding: records the pickled state, runs nothing."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _Encoding
        raise pickle.UnpicklingError(f"the pickle refers to {module}.{name}, which a tiktoken tokenizer "
                                     f"pickle never does (refused: unpickling it could run code)")


def read_tiktoken_pickle(path: str | os.PathLike) -> tuple[dict[bytes, int], str, dict[str, int], str]:
    """(ranks, pattern, special tokens, name) of a pickled tiktoken Encoding, read without running code.
    UserError for anything else: other classes, a registered-by-name encoding, malformed state."""
    path = Path(path)
    try:
        obj = _RestrictedUnpickler(io.BytesIO(path.read_bytes())).load()
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - every unpickling failure is a bad file
        raise UserError(f"{path}: not a tiktoken tokenizer pickle ({e})") from None
    state = obj.state if isinstance(obj, _Encoding) else None
    if isinstance(state, str):
        raise UserError(f"{path} names the registered tiktoken encoding {state!r} instead of holding its ranks; "
                        f"import its .tiktoken file with `nanoforge tokenizer import-tiktoken`")
    ok = isinstance(state, dict) and isinstance(state.get("pat_str"), str) \
        and isinstance(state.get("mergeable_ranks"), dict) and isinstance(state.get("special_tokens"), dict) \
        and all(type(k) is bytes and type(v) is int for k, v in state["mergeable_ranks"].items()) \
        and all(type(k) is str and type(v) is int for k, v in state["special_tokens"].items())
    if not ok:
        raise UserError(f"{path}: not a tiktoken Encoding pickle (expected its name, pat_str, mergeable_ranks "
                        f"and special_tokens)")
    return dict(state["mergeable_ranks"]), state["pat_str"], dict(state["special_tokens"]), \
        str(state.get("name") or "tokenizer")


def _save(tok: Tokenizer, dest: Path, force: bool) -> Path:
    with atomic_dir(dest, force=force, what="tokenizer") as tmp:
        tok.save(tmp)
        export_hf(tok, tmp / "hf")
    return dest


def import_nanochat(src: str | os.PathLike, *, name: str, trust_pickle: bool = False,
                    out: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Convert a nanochat tokenizer folder (or its tokenizer.pkl) into a nanoforge tokenizer folder.
    The pickle is read by a restricted unpickler (`trust_pickle` is accepted for old callers, not needed)."""
    src = Path(src)
    pkl = src / "tokenizer.pkl" if src.is_dir() else src
    if not pkl.is_file():
        raise UserError(f"{src}: no tokenizer.pkl found (give nanochat's tokenizer folder or the .pkl file)")
    tok = nanochat_tokenizer(pkl, name=name)
    return _save(tok, Path(out) if out else tokenizer_dir(name), force)


def nanochat_tokenizer(pkl: str | os.PathLike, *, name: str) -> Tokenizer:
    """The Tokenizer of a nanochat tokenizer.pkl (restricted unpickling, see `read_tiktoken_pickle`)."""
    ranks, pattern, specials, _ = read_tiktoken_pickle(pkl)
    try:
        return Tokenizer.from_ranks(ranks, pattern, specials, name=name,
                                    training={"backend": "nanochat-import", "imported_from": str(Path(pkl).resolve())})
    except (ValueError, TokenizerError) as e:
        raise UserError(f"{pkl}: the tokenizer it holds is not usable ({e})") from None


def import_tiktoken(src: str | os.PathLike, *, name: str, pattern: str,
                    specials: Sequence[str] | None = None, add_chat_specials: bool = True,
                    out: str | os.PathLike | None = None, force: bool = False) -> Path:
    """A tiktoken rank file -> tokenizers/<name>. `pattern` is a regex or a name in PATTERNS. `specials` are
    the file's own special tokens, "TOKEN" (the next free id after the ranks and the specials before it) or
    "TOKEN=ID" (cl100k_base's are not contiguous); our nine chat specials that are missing follow, unless
    `add_chat_specials=False`. Refuses a file that is not "base64 rank" lines and clashing ids."""
    src = Path(src)
    if not src.is_file():
        raise UserError(f"tiktoken file {src} does not exist")
    regex = PATTERNS.get(pattern) or pattern
    try:
        import regex as re_mod

        re_mod.compile(regex)
    except Exception as e:  # noqa: BLE001 - any compile error is a bad pattern
        raise UserError(f"--pattern is neither a known name ({', '.join(PATTERNS)}) nor a valid regex: {e}") from None
    ranks = read_ranks(src)
    if not ranks:
        raise UserError(f"{src} holds no ranks")
    taken = set(ranks.values())
    next_id = max(taken) + 1
    special_ids: dict[str, int] = {}
    items = [s.strip() for s in (specials or []) if s.strip()]
    if add_chat_specials:
        listed = {s.rsplit("=", 1)[0] if s.rsplit("=", 1)[-1].isdigit() else s for s in items}
        items += [s for s in SPECIAL_TOKENS if s not in listed]
    for item in items:
        token, _, num = item.rpartition("=")
        if not (token and num.isdigit()):
            token, num = item, ""
        i = int(num) if num else next_id
        if token in special_ids or i in taken:
            raise UserError(f"special token {item!r}: {'the token' if token in special_ids else f'id {i}'} "
                            f"is already taken")
        special_ids[token] = i
        taken.add(i)
        next_id = max(next_id, i + 1)
    tok = Tokenizer.from_ranks(ranks, regex, special_ids, name=name,
                               training={"backend": "tiktoken-import", "imported_from": str(src.resolve())})
    return _save(tok, Path(out) if out else tokenizer_dir(name), force)
