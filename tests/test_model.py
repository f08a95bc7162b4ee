"""The LLaMA model and the run config: shapes, causality, parameter counts, presets, overrides."""

from __future__ import annotations

import pytest
import torch

from nanoforge.config import list_presets, load_config, preset_model
from nanoforge.errors import UserError
from nanoforge.model import KVCache, LLaMA, ModelConfig

TINY = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, vocab_size=97,
            max_seq_len=32)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(**kw: object) -> LLaMA:
    torch.manual_seed(0)
    model = LLaMA(ModelConfig(**{**TINY, **kw}))
    with torch.no_grad():  # the zero-init residual outputs would make causality tests vacuous
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


def test_forward_returns_float32_logits_and_scalar_loss() -> None:
    model = random_model()
    idx = torch.randint(0, 97, (3, 11))
    logits = model(idx)
    assert logits.shape == (3, 11, 97) and logits.dtype == torch.float32
    loss = model(idx, idx)
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_a_later_token_never_changes_an_earlier_logit() -> None:
    model = random_model()
    idx = torch.randint(0, 97, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 5) % 97
    a, b = model(idx), model(changed)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_mask_and_loss_sum_score_only_masked_positions() -> None:
    model = random_model()
    idx = torch.randint(0, 97, (2, 8))
    tgt = torch.randint(0, 97, (2, 8))
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, 3:] = True
    nats, scored = model.loss_sum(idx, tgt, mask)
    assert nats.shape == (2, 8) and scored.sum().item() == 10
    assert torch.all(nats[:, :3] == 0)
    assert torch.allclose(model(idx, tgt, mask), nats.sum() / scored.sum(), atol=1e-6)


def test_kv_cache_decoding_matches_full_forward() -> None:
    model = random_model()
    idx = torch.randint(0, 97, (2, 12))
    full = model(idx)
    cache = KVCache(model.config, batch_size=2, max_len=32)
    steps = [model(idx[:, :5], cache=cache)] + [model(idx[:, t:t + 1], cache=cache) for t in range(5, 9)]
    steps.append(model(idx[:, 9:], cache=cache))  # several tokens after a filled cache
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_num_params_matches_the_module() -> None:
    for kw in ({}, {"tie_embeddings": True}, {"pad_vocab_to": 64}):
        model = random_model(**kw)
        assert model.config.num_params() == sum(p.numel() for p in model.parameters())
    padded = random_model(pad_vocab_to=64)
    assert padded.tok_embeddings.weight.shape[0] == 128 and padded(torch.zeros(1, 3, dtype=torch.long)).shape[-1] == 97
    assert random_model().tok_embeddings.weight.shape[0] == 97  # no padding unless asked


def test_nano_125m_has_176m_parameters_and_param_names_for_export() -> None:
    cfg = preset_model("nano-125m")
    assert cfg.num_params() == 176_179_968
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim) == (768, 12, 12, 4, 64, 2048)
    names = set(random_model().state_dict())
    for n in ("tok_embeddings.weight", "layers.1.attention_norm.weight", "layers.1.attention.wq.weight",
              "layers.1.attention.wo.weight", "layers.1.ffn_norm.weight", "layers.1.feed_forward.w3.weight",
              "norm.weight", "output.weight"):
        assert n in names
    assert "output.weight" not in random_model(tie_embeddings=True).state_dict()


def test_flops_per_token_follows_the_6n_plus_attention_convention() -> None:
    cfg = ModelConfig(**TINY)
    matmul = sum(p.numel() for n, p in LLaMA(cfg).named_parameters() if p.dim() == 2 and "tok_emb" not in n)
    assert cfg.flops_per_token(32) == 6 * matmul + 12 * 2 * 4 * 16 * 32


def test_matches_hugging_face_llama_logits() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = random_model()
    c = model.config
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False))
    hf.load_state_dict(to_hf(model.state_dict()))
    idx = torch.randint(0, 97, (2, 16))
    assert torch.allclose(hf(idx).logits, model(idx), atol=1e-4)


def to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    rename = {"tok_embeddings": "model.embed_tokens", "norm.weight": "model.norm.weight", "output": "lm_head",
              "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
              "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
              "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj"}
    out = {}
    for name, t in sd.items():
        new = name if not name.startswith("layers.") else "model." + name
        for a, b in rename.items():
            if new.startswith(a) or f".{a}" in new:
                new = new.replace(a, b, 1)
                break
        out[new] = t
    return out


# --- config -------------------------------------------------------------------------------------------

def test_presets_load_and_the_depth_dial_derives_the_shape() -> None:
    assert {"cpu-demo", "ci", "nano-125m", "d12", "d20"} <= set(list_presets())
    d20 = load_config(preset="d20").model
    assert (d20.d_model, d20.n_layers, d20.n_heads, d20.head_dim) == (1280, 20, 10, 128)
    demo = load_config(preset="cpu-demo", overrides=["model.depth=6"]).model
    assert (demo.d_model, demo.n_layers, demo.n_heads) == (384, 6, 3)
    explicit = load_config(preset="d12", overrides=["model.n_heads=12", "model.head_dim=64"]).model
    assert (explicit.d_model, explicit.n_heads, explicit.head_dim) == (768, 12, 64)
    assert 1e6 < preset_model("cpu-demo").num_params() < 1e7


def test_overrides_are_typed() -> None:
    cfg = load_config(preset="ci", overrides=["train.lr=1e-3", "train.optimizer=muon", "model.tie_embeddings=true",
                                             "eval.prompts=a,b"])
    assert cfg.train.lr == 1e-3 and cfg.train.optimizer == "muon" and cfg.model.tie_embeddings
    assert cfg.eval.prompts == ["a", "b"]
    assert load_config(preset="ci", overrides=["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize("kw, message", [
    ({"preset": "nope"}, "available presets: ci, cpu-demo"),
    ({"preset": "ci", "overrides": ["train.lrr=1"]}, "valid keys: train.max_steps"),
    ({"preset": "ci", "overrides": ["trian.lr=1"]}, "valid sections: model, train"),
    ({"preset": "ci", "overrides": ["train.max_steps=abc"]}, "train.max_steps expects int"),
    ({"preset": "ci", "overrides": ["train.optimizer=sgd"]}, "must be one of adamw, muon"),
    ({"preset": "ci", "overrides": ["model.n_kv_heads=3"]}, "multiple of model.n_kv_heads"),
    ({"preset": "ci", "overrides": ["lr=1"]}, "section.key=value"),
])
def test_bad_config_is_one_clear_user_error(kw: dict, message: str) -> None:
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(**kw)


def test_resolved_config_round_trips_through_toml(tmp_path) -> None:
    cfg = load_config(preset="cpu-demo", overrides=["train.max_steps=7"])
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())
    again = load_config(path=path)
    assert again.to_dict() | {"preset": ""} == cfg.to_dict() | {"preset": ""}


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_loss_gradients_match_plain_cross_entropy(tie: bool) -> None:
    import torch.nn.functional as F

    model = random_model(tie_embeddings=tie, pad_vocab_to=64)
    idx, tgt = torch.randint(0, 97, (3, 17)), torch.randint(0, 97, (3, 17))
    mask = torch.rand(3, 17) > 0.3
    model(idx, tgt, mask).backward()  # the chunked path (fp32, grad enabled)
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(idx)
    F.cross_entropy(logits.view(-1, 97), tgt.masked_fill(~mask, -1).view(-1), ignore_index=-1).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(fused[n], p.grad, atol=1e-5), n
