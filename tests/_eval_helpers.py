"""Shared fixtures for the eval/export/infer tests: a tiny trained tokenizer and a small random LLaMA
checkpoint (random weights everywhere, so parity tests exercise every tensor; no training needed)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = ("der die das Haus Baum Katze Hund rot blau grün groß klein ist hat sieht läuft schnell langsam "
         "und oder nicht ein eine Sonne Mond Stern Wasser Feuer Erde Himmel zwei drei vier fünf sechs").split()


def write_text(folder: Path, n_docs: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 25))) + "." for _ in range(n_docs)]
    path = folder / "docs.txt"
    path.write_text("\n\n".join(lines), encoding="utf-8")
    return folder


def make_tokenizer(root: Path, vocab_size: int = 512) -> Path:
    from nanoforge.tokenizer.train import train_tokenizer

    data = write_text(root / "text")
    return train_tokenizer(data, vocab_size=vocab_size, backend="rustbpe", out=root / "tok", force=True)


def make_checkpoint(root: Path, tok_path: Path, *, tie: bool = False, n_kv_heads: int = 2, seed: int = 0,
                    pad_vocab_to: int = 0, name: str = "ckpt") -> Path:
    from nanoforge.checkpoint import save_checkpoint
    from nanoforge.model import LLaMA, ModelConfig
    from nanoforge.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_path)
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, head_dim=16, ffn_dim=128,
                      vocab_size=tok.vocab_size, max_seq_len=256, tie_embeddings=tie, pad_vocab_to=pad_vocab_to)
    model = LLaMA(cfg)
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5 if "tok_embeddings" in name_ else 0.2)
            else:
                p.uniform_(0.5, 1.5)
    folder = root / name
    meta = {"phase": "base", "tag": name, "model_config": cfg.to_dict(), "config": None,
            "tokenizer": {"path": str(tok_path), "name": tok.name, "fingerprint": tok.fingerprint},
            "tokens": None, "val_bpb": None}
    save_checkpoint(folder, 10, model, None, meta)
    return folder
