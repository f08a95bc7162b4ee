"""Hugging Face fast-tokenizer files for our tokenizers, and imports of foreign ones.

`export_hf(tok, out_dir)` writes tokenizer.json + tokenizer_config.json + special_tokens_map.json so that
`transformers.AutoTokenizer.from_pretrained(out_dir)` gives exactly our ids (with BOS, which a
TemplateProcessing post-processor adds the way our training data starts documents) and our decoded text.
The BPE model is rebuilt from the ranks, one merge per token (the merge whose halves BPE-encode to two
tokens of lower rank), with `ignore_merges` so a piece that is itself a token maps to it, as in tiktoken.
Special tokens are registered as special added tokens but `split_special_tokens: true` in the config makes
`<|bos|>` inside text plain text, matching our `encode` default.

With `chat=True` (a chat model's export) the folder also gets the Jinja chat template of
tokenizer/chat_template.jinja, so `apply_chat_template` gives `render_conversation`'s ids. The template's own
control tokens must be parsed, so such a tokenizer parses special-token strings (`split_special_tokens:
false`); the template escapes them in message text ("<|" → "<\ue000|", "\ue000" → "\ue000\ue001") and a
normalizer undoes the escape after special tokens were matched, so typed specials still encode as text. The
price: plain `tokenizer(text)` on such an export parses specials in `text`, and the two private-use sequences
"<\ue000|" and "\ue000\ue001" are rewritten in any input.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanoforge.errors import UserError
from nanoforge.home import atomic_write_json, atomic_write_text
from nanoforge.tokenizer.core import bytes_to_unicode

if TYPE_CHECKING:
    from nanoforge.tokenizer.core import Tokenizer


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """BPE-encode `token` with merges of rank < max_rank (tiktoken's algorithm, by rank of concatenation)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:  # two parts are final: merging them makes `token`, whose rank is max_rank
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            return parts
        parts = parts[:best] + [parts[best] + parts[best + 1]] + parts[best + 2:]
    return parts


def tokenizer_json_from_ranks(ranks: dict[bytes, int], pattern: str, special_tokens: dict[str, int],
                              bos: str | None) -> dict[str, Any]:
    """A tokenizer.json (as a dict) equivalent to tiktoken with these ranks, pattern and specials."""
    table = bytes_to_unicode()  # str.translate table: a latin-1 code point is the byte value
    pieces = {t: t.decode("latin-1").translate(table) for t in ranks}
    vocab = {pieces[t]: r for t, r in ranks.items()}
    get = ranks.get
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        n = len(tok)
        if n == 1:
            continue
        # Fast path: a single split into two lower-rank tokens must be the merge; with two or more, ask BPE.
        split = 0
        for i in range(1, n):
            if get(tok[:i], rank) < rank and get(tok[i:], rank) < rank:
                if split:
                    split = -1
                    break
                split = i
        parts = [tok[:split], tok[split:]] if split > 0 else _bpe_split(ranks, tok, rank)
        if len(parts) != 2 or parts[0] not in pieces or parts[1] not in pieces:
            raise UserError(f"rank {rank} ({tok!r}) is not the merge of two lower-rank tokens: "
                            "these ranks are not byte-level BPE")
        merges.append([pieces[parts[0]], pieces[parts[1]]])
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for s, i in sorted(special_tokens.items(), key=lambda kv: kv[1])]
    post = None
    if bos is not None:
        bos_id = special_tokens[bos]
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }


def with_bos_post_processor(hf_json: str, bos: str, bos_id: int) -> str:
    """`hf_json` with a TemplateProcessing post-processor that prepends `bos`."""
    d = json.loads(hf_json)
    d["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    return json.dumps(d, ensure_ascii=False)


HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
ESCAPE, ESCAPE2 = "\ue000", "\ue001"
# Undoes the template's escape after special tokens are matched (added tokens are matched on the raw text).
CHAT_NORMALIZERS = [{"type": "Replace", "pattern": {"String": "<" + ESCAPE + "|"}, "content": "<|"},
                    {"type": "Replace", "pattern": {"String": ESCAPE + ESCAPE2}, "content": ESCAPE}]


def chat_template() -> str:
    """The Jinja chat template of nanoforge's chat format (the same ids as tokenizer/chat.py renders)."""
    return (Path(__file__).parent / "chat_template.jinja").read_text(encoding="utf-8")


def _with_chat_normalizer(d: dict[str, Any]) -> dict[str, Any]:
    from nanoforge.tokenizer.chat import CHAT_SPECIALS

    for t in d.get("added_tokens") or []:
        if t.get("content") in CHAT_SPECIALS:
            t["normalized"] = False  # matched on the raw text, before the escape is undone
    norm = d.get("normalizer")
    d["normalizer"] = {"type": "Sequence", "normalizers": [*CHAT_NORMALIZERS, *([norm] if norm else [])]}
    return d


def export_hf(tok: Tokenizer, out_dir: str | os.PathLike, *, force: bool = True, chat: bool = False) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`, each file
    atomically; other files there (a model's weights, say) are left alone. With force=False a folder that
    already holds one of those files is refused. `chat=True` adds the chat template (tokenizer_config.json's
    `chat_template` and chat_template.jinja); refused for a tokenizer without the nine chat specials."""
    if chat:
        from nanoforge.tokenizer.chat import CHAT_SPECIALS

        missing = [s for s in CHAT_SPECIALS if s not in tok.special_tokens]
        if missing:
            raise UserError(f"tokenizer {tok.name} lacks the chat special tokens {', '.join(missing)}: "
                            "no chat template can be written for it")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder")
    present = [f for f in HF_FILES if (out / f).exists()]
    if present and not force:
        raise UserError(f"{out} already holds {', '.join(present)} (use --force to overwrite them)")
    out.mkdir(parents=True, exist_ok=True)
    bos = next((s for s, i in tok.special_tokens.items() if i == tok.bos_id), None)
    eos = next((s for s, i in tok.special_tokens.items() if i == tok.eos_id), None)
    if tok.engine == "tiktoken":
        d = tokenizer_json_from_ranks(tok.ranks, tok.pattern, tok.special_tokens, bos)
    else:
        d = json.loads(tok._hf_json)
    if chat:
        d = _with_chat_normalizer(d)
    text = json.dumps(d, ensure_ascii=False) if chat or tok.engine == "tiktoken" else tok._hf_json
    atomic_write_text(out / "tokenizer.json", text)
    specials = {"bos_token": bos, "eos_token": eos, "pad_token": eos}
    specials = {k: v for k, v in specials.items() if v is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1_000_000_000,
              "clean_up_tokenization_spaces": False, "split_special_tokens": not chat,
              "add_bos_token": False, "add_eos_token": False, **specials,
              "additional_special_tokens": [s for s in tok.special_tokens if s not in specials.values()]}
    if chat:
        config["chat_template"] = chat_template()
        atomic_write_text(out / "chat_template.jinja", config["chat_template"])
    atomic_write_json(out / "tokenizer_config.json", config)
    atomic_write_json(out / "special_tokens_map.json", specials)
    return out


def import_hf(src: str | os.PathLike, *, name: str, out: str | os.PathLike | None = None,
              force: bool = False) -> Path:
    """Import a Hugging Face tokenizer folder or tokenizer.json as a nanoforge tokenizer (engine "hf").
    Kept as HF's own files: its ids are whatever that tokenizer gives."""
    from nanoforge.home import atomic_dir, tokenizer_dir
    from nanoforge.tokenizer.core import Tokenizer

    src = Path(src)
    file = src / "tokenizer.json" if src.is_dir() else src
    if not file.is_file():
        raise UserError(f"{src}: no tokenizer.json found (give a Hugging Face tokenizer folder or a tokenizer.json)")
    try:
        hf_json = file.read_text(encoding="utf-8")
        from tokenizers import Tokenizer as HFTokenizer

        HFTokenizer.from_str(hf_json)
    except Exception as e:
        raise UserError(f"{file}: not a Hugging Face tokenizer.json ({str(e).splitlines()[0]})") from None
    cfg: dict[str, Any] = {}
    if (file.parent / "tokenizer_config.json").is_file():
        try:
            cfg = json.loads((file.parent / "tokenizer_config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            cfg = {}

    def token_str(v: Any) -> str | None:
        return v.get("content") if isinstance(v, dict) else v

    tok = Tokenizer.from_hf_json(hf_json, name=name, bos=token_str(cfg.get("bos_token")),
                                 eos=token_str(cfg.get("eos_token")), training={"imported_from": str(src.resolve())})
    dest = Path(out) if out else tokenizer_dir(name)
    with atomic_dir(dest, force=force, what="tokenizer") as tmp:
        (tmp / "hf").mkdir()
        atomic_write_text(tmp / "hf" / "tokenizer.json", hf_json)
        for extra in HF_FILES[1:]:
            if (file.parent / extra).is_file():
                shutil.copy(file.parent / extra, tmp / "hf" / extra)
        tok.save(tmp)
    return dest
