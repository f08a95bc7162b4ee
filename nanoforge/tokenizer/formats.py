"""Importing tokenizers saved in other projects' formats (Hugging Face imports live in hf.py).

nanochat saves its tokenizer as `tokenizer.pkl`, a pickled tiktoken Encoding. Unpickling runs whatever code
the file names, so a pickle from an untrusted source can take over the machine: we load it only when the
user passes `trust_pickle=True` (`--trust-pickle`), and store the result in our own pickle-free format.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

from nanoforge.errors import UserError
from nanoforge.home import atomic_dir, tokenizer_dir
from nanoforge.tokenizer.core import Tokenizer
from nanoforge.tokenizer.hf import export_hf


def import_nanochat(src: str | os.PathLike, *, name: str, trust_pickle: bool = False,
                    out: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Convert a nanochat tokenizer folder (or its tokenizer.pkl) into a nanoforge tokenizer folder."""
    src = Path(src)
    pkl = src / "tokenizer.pkl" if src.is_dir() else src
    if not pkl.is_file():
        raise UserError(f"{src}: no tokenizer.pkl found (give nanochat's tokenizer folder or the .pkl file)")
    if not trust_pickle:
        raise UserError(f"{pkl} is a pickle, and loading a pickle can run arbitrary code: pass --trust-pickle "
                        "if you trust where it came from (it is converted to nanoforge's pickle-free format)")
    try:
        with open(pkl, "rb") as f:
            enc = pickle.load(f)  # noqa: S301 - the user vouched for it with --trust-pickle
        ranks = dict(enc._mergeable_ranks)
        pattern = enc._pat_str
        specials = dict(enc._special_tokens)
    except Exception as e:
        raise UserError(f"{pkl}: not a nanochat tokenizer pickle ({type(e).__name__}: {e})") from None
    tok = Tokenizer.from_ranks(ranks, pattern, specials, name=name,
                               training={"backend": "nanochat-import", "imported_from": str(pkl.resolve())})
    dest = Path(out) if out else tokenizer_dir(name)
    with atomic_dir(dest, force=force, what="tokenizer") as tmp:
        tok.save(tmp)
        export_hf(tok, tmp / "hf")
    return dest
