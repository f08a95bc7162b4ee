"""A scripted stand-in for a model: it emits a fixed token sequence through the engine's cache path, so
tests of text streaming and tool calls know exactly which tokens come."""

from __future__ import annotations

import torch


class Scripted(torch.nn.Module):
    """Predicts script[p + 1] after position p (whatever the input), through the engine's cache path."""

    def __init__(self, config, script: list[int]) -> None:
        super().__init__()
        self.config = config
        self.script = script
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def hidden(self, idx: torch.Tensor, cache=None) -> torch.Tensor:
        pos = torch.tensor(cache.starts).unsqueeze(1) + torch.arange(idx.shape[1])
        return pos.unsqueeze(-1).float()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        nxt = torch.tensor([self.script[min(int(p) + 1, len(self.script) - 1)] for p in h[..., 0].reshape(-1)])
        out = torch.full((nxt.numel(), self.config.vocab_size), -1e9)
        out[torch.arange(nxt.numel()), nxt] = 0.0
        return out.view(*h.shape[:-1], -1)


def byte_ids(tok, text: str) -> list[int]:
    """One token per UTF-8 byte: every multi-byte character is split across tokens."""
    return [tok.ranks[bytes([b])] for b in text.encode("utf-8")]
