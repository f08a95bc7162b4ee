"""ModelConfig: the shape of a LLaMA-style decoder, its parameter count and training FLOPs per token.

    preset_model("nano-125m").num_params()  # 176,179,968

The depth dial (`depth_config`) follows nanochat: width = 64·depth, heads = width/128.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from nanoforge.errors import UserError

MLPS = ("swiglu", "relu2")


@dataclass
class ModelConfig:
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int = 64
    ffn_dim: int = 768
    vocab_size: int = 4096
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    pad_vocab_to: int = 0  # 0 = no padding; 64 pads the embedding rows to a multiple of 64 (faster matmuls)
    # Architecture options (the defaults are plain Llama; nanochat 2025: relu2, qk_norm, embed_norm,
    # norm_weights=false, logit_softcap=15; Qwen2: qkv_bias).
    mlp: str = "swiglu"            # swiglu (gate/up/down) | relu2 (relu(x)², up/down, no gate)
    qk_norm: bool = False          # parameter-free RMSNorm of q and k per head, after the rotary
    embed_norm: bool = False       # RMSNorm of the token embeddings before the first block
    norm_weights: bool = True      # false: every RMSNorm is parameter-free
    logit_softcap: float = 0.0     # > 0: logits = cap · tanh(logits / cap)
    qkv_bias: bool = False         # biases on the q, k and v projections

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size",
                     "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads "
                            f"({self.n_kv_heads})")
        if self.head_dim % 2:
            raise UserError(f"model.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.mlp not in MLPS:
            raise UserError(f"model.mlp must be one of {', '.join(MLPS)}, got {self.mlp!r}")
        if self.logit_softcap < 0:
            raise UserError(f"model.logit_softcap must be >= 0 (0 = off), got {self.logit_softcap}")
        if self.pad_vocab_to < 0:
            raise UserError(f"model.pad_vocab_to must be >= 0, got {self.pad_vocab_to}")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and output matrices: vocab_size rounded up to pad_vocab_to (if set)."""
        m = self.pad_vocab_to
        return self.vocab_size if m <= 0 else -(-self.vocab_size // m) * m

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}  # keys added later default: old metas still load
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown model config keys {unknown}; valid keys: {', '.join(sorted(names))}")
        return cls(**d)

    def num_params(self, embeddings: bool = True) -> int:
        """Parameter count; embeddings=False leaves out the token embedding and the output head."""
        d, hd = self.d_model, self.head_dim
        attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2
        if self.qkv_bias:
            attn += (self.n_heads + 2 * self.n_kv_heads) * hd
        ffn = (3 if self.mlp == "swiglu" else 2) * d * self.ffn_dim
        norm = d if self.norm_weights else 0
        block = attn + ffn + 2 * norm
        total = self.n_layers * block + norm * (2 if self.embed_norm else 1)  # + final (and embedding) norm
        if embeddings:
            emb = self.padded_vocab_size * d
            total += emb if self.tie_embeddings else 2 * emb
        return total

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 × matmul parameters + 12·L·H·h·T for attention (nanochat/torchtitan).
        Matmul parameters are all weights except norms and the input embedding (a lookup, not a matmul);
        the output head counts whether tied or not."""
        d = self.d_model
        norms = (2 * self.n_layers + 1 + int(self.embed_norm)) * d if self.norm_weights else 0
        biases = self.n_layers * (self.n_heads + 2 * self.n_kv_heads) * self.head_dim if self.qkv_bias else 0
        matmul = self.num_params(embeddings=False) - norms - biases + self.padded_vocab_size * d
        return 6 * matmul + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len


def depth_config(depth: int) -> dict[str, int]:
    """nanochat's dial: width 64·depth, head dim 128 (heads = width/128), SwiGLU hidden ≈ 8/3·width
    rounded up to 64 (the same parameters as nanochat's 4× ReLU² MLP)."""
    if depth <= 0:
        raise UserError(f"model.depth must be positive, got {depth}")
    width = 64 * depth
    heads = max(1, width // 128)
    return {"d_model": width, "n_layers": depth, "n_heads": heads, "n_kv_heads": heads,
            "head_dim": width // heads, "ffn_dim": -(-(8 * width // 3) // 64) * 64}
