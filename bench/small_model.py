"""What the generation and RL benchmarks share: a small chat checkpoint with random but non-trivial
weights and a tokenizer trained on the benchmark's own text, and a clock that reads wall and CPU time."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch


def make_checkpoint(root: Path, texts: list[str], *, ctx: int, vocab_size: int = 1024,
                    config: dict[str, Any] | None = None, phase: str = "sft", match_vocab: bool = False) -> Path:
    """A checkpoint of the cpu-demo widths with a `ctx`-token context in root/ckpt: a `vocab_size` BPE
    tokenizer trained on `texts` (root/tok), random weights with every matrix non-trivial (embeddings
    N(0, 1), the rest N(0, 0.5/√fan_in), so sampling is neither uniform nor greedy), meta phase `phase`
    (sft: the export writes the chat template) and `config` as its resolved run config (None: none).
    The model keeps the preset's 4,096-row vocabulary unless `match_vocab` sizes it to the tokenizer's
    (then it can never sample an id the tokenizer lacks)."""
    from nanoforge.checkpoint import save_checkpoint
    from nanoforge.config import preset_model
    from nanoforge.model import LLaMA
    from nanoforge.tokenizer import Tokenizer
    from nanoforge.tokenizer.train import train_tokenizer

    (root / "text").mkdir(parents=True)
    (root / "text" / "docs.txt").write_text("\n\n".join(texts), encoding="utf-8")
    tok_path = train_tokenizer(root / "text", vocab_size=vocab_size, backend="rustbpe", out=root / "tok", force=True)
    tok = Tokenizer.load(tok_path)
    cfg = preset_model("cpu-demo")
    cfg.max_seq_len = ctx
    if match_vocab:
        cfg.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = LLaMA(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 if "tok_embeddings" in name else 0.5 / p.shape[1] ** 0.5)
    meta = {"phase": phase, "tag": "bench", "model_config": cfg.to_dict(), "config": config,
            "tokenizer": {"path": str(tok_path), "name": tok.name, "fingerprint": tok.fingerprint}}
    save_checkpoint(root / "ckpt", 1, model, None, meta)
    return root / "ckpt"


def now() -> tuple[float, float]:
    """(wall clock, this process's CPU time): on a machine shared with other jobs the CPU time is the
    steadier measure of the work done."""
    return time.perf_counter(), time.process_time()
