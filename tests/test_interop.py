"""Interoperability: nanochat checkpoints (transformers' NanoChatForCausalLM is the oracle), the Hugging Face
classes each architecture exports to (Llama, Qwen2, NanoChat), restricted unpickling of tokenizer.pkl."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from _eval_helpers import make_tokenizer

from nanoforge.cli import main
from nanoforge.errors import UserError
from nanoforge.export.hf import export_hf, import_hf
from nanoforge.export.nanochat import NANOCHAT_EPS, import_nanochat
from nanoforge.infer.engine import generate_ids, load_checkpoint
from nanoforge.infer.models import load_export
from nanoforge.tokenizer import Tokenizer
from nanoforge.tokenizer.core import NANOCHAT_PATTERN
from nanoforge.tokenizer.formats import read_tiktoken_pickle

pytestmark = pytest.mark.usefixtures("one_thread")

N_EMBD, N_HEAD, N_LAYER = 64, 2, 2


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=500)  # 402 ids (small text) -> 448 rows


def nanochat_state(vocab: int, seed: int = 0, extra: dict[str, torch.Tensor] | None = None) -> dict:
    """Random weights in nanochat's names, shapes and dtypes (the embedding in bf16, rows padded to 64)."""
    g = torch.Generator().manual_seed(seed)
    rows, d = -(-vocab // 64) * 64, N_EMBD

    def w(*shape: int, std: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    state = {"transformer.wte.weight": w(rows, d, std=1.0).to(torch.bfloat16)}
    for i in range(N_LAYER):
        p = f"transformer.h.{i}."
        state |= {p + "attn.c_q.weight": w(d, d), p + "attn.c_k.weight": w(d, d), p + "attn.c_v.weight": w(d, d),
                  p + "attn.c_proj.weight": w(d, d), p + "mlp.c_fc.weight": w(4 * d, d),
                  p + "mlp.c_proj.weight": w(d, 4 * d, std=0.05)}
    state["lm_head.weight"] = w(rows, d, std=0.5)
    return state | (extra or {})


def write_nanochat(base: Path, tok: Tokenizer, state: dict, step: int = 1200, meta: dict | None = None) -> Path:
    """nanochat's own layout: <base>/base_checkpoints/d2/{model,meta}_<step> and <base>/tokenizer/."""
    import tiktoken

    ckpt = base / "base_checkpoints" / "d2"
    ckpt.mkdir(parents=True)
    torch.save(state, ckpt / f"model_{step:06d}.pt")
    cfg = {"sequence_len": 256, "vocab_size": tok.vocab_size, "n_layer": N_LAYER, "n_head": N_HEAD,
           "n_kv_head": N_HEAD, "n_embd": N_EMBD}
    (ckpt / f"meta_{step:06d}.json").write_text(json.dumps(meta if meta is not None else
                                                           {"step": step, "val_bpb": 1.23, "model_config": cfg}))
    (base / "tokenizer").mkdir()
    enc = tiktoken.Encoding(name="rustbpe", pat_str=NANOCHAT_PATTERN, mergeable_ranks=tok.ranks,
                            special_tokens=tok.special_tokens)
    (base / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(enc))
    torch.save(torch.tensor(tok.token_bytes, dtype=torch.int32), base / "tokenizer" / "token_bytes.pt")
    return ckpt


def nanochat_oracle(state: dict, vocab: int):
    """transformers' NanoChatForCausalLM holding nanochat's tensors, renamed only."""
    from transformers import NanoChatConfig, NanoChatForCausalLM

    rows = state["transformer.wte.weight"].shape[0]
    cfg = NanoChatConfig(vocab_size=rows, hidden_size=N_EMBD, intermediate_size=4 * N_EMBD,
                         num_hidden_layers=N_LAYER, num_attention_heads=N_HEAD, num_key_value_heads=N_HEAD,
                         max_position_embeddings=256, rms_norm_eps=NANOCHAT_EPS, final_logit_softcapping=15.0,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)
    names = {"attn.c_q": "self_attn.q_proj", "attn.c_k": "self_attn.k_proj", "attn.c_v": "self_attn.v_proj",
             "attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    hf_state = {"model.embed_tokens.weight": state["transformer.wte.weight"].float(),
                "lm_head.weight": state["lm_head.weight"]}
    for k, v in state.items():
        if k.startswith("transformer.h."):
            i, rest = k.split(".")[2], ".".join(k.split(".")[3:-1])
            hf_state[f"model.layers.{i}.{names[rest]}.weight"] = v
    model = NanoChatForCausalLM(cfg).eval()
    model.load_state_dict(hf_state, strict=True)
    return model


@pytest.fixture(scope="module")
def nanochat_dir(tmp_path_factory: pytest.TempPathFactory, tok_path: Path) -> tuple[Path, dict]:
    tok = Tokenizer.load(tok_path)
    state = nanochat_state(tok.vocab_size)
    return write_nanochat(tmp_path_factory.mktemp("nanochat"), tok, state), state


def test_imported_nanochat_checkpoint_gives_nanochat_for_causal_lm_logits(nanochat_dir: tuple, tok_path: Path,
                                                                           nanoforge_home: Path) -> None:
    folder, state = nanochat_dir
    dest = import_nanochat(folder, "d2", phase="sft")
    assert dest == nanoforge_home / "checkpoints" / "sft" / "d2" and (dest / "model_001200.safetensors").is_file()
    model, tok, meta = load_checkpoint("d2")  # the imported tokenizer is found through the meta
    assert tok.fingerprint == Tokenizer.load(tok_path).fingerprint
    assert meta["imported_config"]["val_bpb"] == 1.23 and meta["model_config"]["pad_vocab_to"] == 64
    oracle = nanochat_oracle(state, tok.vocab_size)
    x = torch.tensor([tok.encode("der Hund sieht die Katze und läuft schnell über die Erde", bos=True)])
    with torch.no_grad():
        ours, theirs = model(x), oracle(x).logits[..., :tok.vocab_size]
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert ours.abs().max().item() <= 15.0  # soft-capped


def test_nanochat_exports_as_nanochat_for_causal_lm_and_imports_back(nanochat_dir: tuple, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder, _ = nanochat_dir
    ckpt = import_nanochat(folder, "d2")
    out = export_hf(ckpt, tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["NanoChatForCausalLM"] and cfg["final_logit_softcapping"] == 15.0
    model, tok, _ = load_checkpoint(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tok.encode("zwei drei vier Sonne Mond", bos=True)
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= 1e-4
    hf.generation_config.eos_token_id = None
    theirs = hf.generate(x, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    assert list(generate_ids(model, ids, max_new_tokens=8)) == theirs
    again, _, _ = load_checkpoint(import_hf(out, "d2-again"))
    served, _ = load_export(out)  # what `nanoforge serve EXPORT` runs
    with torch.no_grad():
        assert (again(x) - model(x)).abs().max().item() <= 1e-5
        assert (served(x) - model(x)).abs().max().item() <= 1e-5


def test_import_nanochat_cli_from_one_folder(nanochat_dir: tuple, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    folder, _ = nanochat_dir
    flat = tmp_path / "hub-download"  # what a Hub download gives: every file in one folder
    flat.mkdir()
    for f in [*folder.iterdir(), *(folder.parent.parent / "tokenizer").iterdir()]:
        (flat / f.name).write_bytes(f.read_bytes())
    assert main(["import", "nanochat", str(flat), "--tag", "flat", "--step", "1200", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == 1200 and Path(info["checkpoint"]).name == "flat"
    assert main(["import", "nanochat", str(flat), "--tag", "flat"]) == 2  # exists, no --force
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["newer", "pickle_code", "no_model_config", "vocab_mismatch", "unknown_key"])
def test_import_nanochat_refuses_bad_input_in_one_line(case: str, tmp_path: Path, tok_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    tok = Tokenizer.load(tok_path)
    extra = {"newer": {"resid_lambdas": torch.ones(N_LAYER), "value_embeds.0.weight": torch.zeros(4, 4)},
             "unknown_key": {"transformer.h.0.attn.rotary.bias": torch.zeros(3)}}.get(case)
    state = nanochat_state(tok.vocab_size, extra=extra)
    meta = {"step": 5, "user_config": {}} if case == "no_model_config" else None
    folder = write_nanochat(tmp_path / "nc", tok, state, step=5, meta=meta)
    if case == "pickle_code":  # a .pt that only full unpickling can read
        torch.save({"weights": state, "fn": Path}, folder / "model_000005.pt")
    if case == "vocab_mismatch":
        cfg = json.loads((folder / "meta_000005.json").read_text())
        cfg["model_config"]["vocab_size"] = 448
        (folder / "meta_000005.json").write_text(json.dumps(cfg))
        torch.save(nanochat_state(448), folder / "model_000005.pt")
    assert main(["import", "nanochat", str(folder), "--tag", "bad"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    needle = {"newer": "2026 architecture (keys resid_lambdas, value_embeds.0.weight)",
              "pickle_code": "needs full unpickling", "no_model_config": "has no model_config",
              "vocab_mismatch": f"{tok.vocab_size} tokens but the checkpoint's vocabulary is 448",
              "unknown_key": "transformer.h.0.attn.rotary.bias"}[case]
    assert needle in err
    assert not (Path(tmp_path) / "checkpoints").exists()


class _RunsCode:
    def __reduce__(self):
        return (print, ("pwned",))


def test_restricted_unpickler_reads_tiktoken_and_refuses_code(tmp_path: Path, tok_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    import tiktoken

    tok = Tokenizer.load(tok_path)
    enc = tiktoken.Encoding(name="nc", pat_str=NANOCHAT_PATTERN, mergeable_ranks=tok.ranks,
                            special_tokens=tok.special_tokens)
    (tmp_path / "ok.pkl").write_bytes(pickle.dumps(enc))
    ranks, pattern, specials, name = read_tiktoken_pickle(tmp_path / "ok.pkl")
    assert (ranks, pattern, specials, name) == (tok.ranks, NANOCHAT_PATTERN, tok.special_tokens, "nc")
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(UserError, match="builtins.print"):
        read_tiktoken_pickle(tmp_path / "evil.pkl")
    assert "pwned" not in capsys.readouterr().out
    # a call hidden inside a container is refused too
    (tmp_path / "nested.pkl").write_bytes(pickle.dumps({"x": _RunsCode()}))
    with pytest.raises(UserError, match="refused"):
        read_tiktoken_pickle(tmp_path / "nested.pkl")
    # the tokenizer command needs no --trust-pickle any more
    (tmp_path / "nc").mkdir()
    (tmp_path / "nc" / "tokenizer.pkl").write_bytes(pickle.dumps(enc))
    assert main(["tokenizer", "import-nanochat", str(tmp_path / "nc"), "--name", "nc"]) == 0
    assert Tokenizer.load("nc").fingerprint == tok.fingerprint


def make_variant(root: Path, tok_path: Path, name: str, **options: object) -> Path:
    """A random checkpoint with model options (every tensor random, biases and norm weights included)."""
    from nanoforge.checkpoint import save_checkpoint
    from nanoforge.model import LLaMA, ModelConfig

    tok = Tokenizer.load(tok_path)
    torch.manual_seed(3)
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
                      vocab_size=tok.vocab_size, max_seq_len=128, **options)
    model = LLaMA(cfg)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5 if "tok_embeddings" in pname else 0.2)
            elif pname.endswith("bias"):
                p.normal_(0.0, 0.5)
            else:
                p.uniform_(0.5, 1.5)
    meta = {"phase": "base", "tag": name, "model_config": cfg.to_dict(), "config": None,
            "tokenizer": {"path": str(tok_path), "name": tok.name, "fingerprint": tok.fingerprint},
            "tokens": None, "val_bpb": None}
    save_checkpoint(root / name, 7, model, None, meta)
    return root / name


@pytest.mark.parametrize(("options", "cls"), [({}, "LlamaForCausalLM"), ({"qkv_bias": True}, "Qwen2ForCausalLM"),
                                              ({"qkv_bias": True, "tie_embeddings": True}, "Qwen2ForCausalLM")])
def test_each_variant_exports_to_its_class_and_imports_back(options: dict, cls: str, tmp_path: Path,
                                                            tok_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    ckpt = make_variant(tmp_path, tok_path, "v", **options)
    out = export_hf(ckpt, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == [cls]
    model, tok, _ = load_checkpoint(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == cls
    x = torch.tensor([tok.encode("der Hund sieht die Katze", bos=True)])
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= 1e-4
        again, _, _ = load_checkpoint(import_hf(out, "back"))
        assert again.config.qkv_bias == bool(options.get("qkv_bias"))
        assert (again(x) - model(x)).abs().max().item() <= 1e-5
        assert (load_export(out)[0](x) - model(x)).abs().max().item() <= 1e-5


def test_a_model_no_class_computes_is_refused_for_export(tmp_path: Path, tok_path: Path) -> None:
    ckpt = make_variant(tmp_path, tok_path, "odd", mlp="relu2")  # ReLU² with norm weights: neither class
    with pytest.raises(UserError, match="no Hugging Face class computes this model"):
        export_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_an_imported_nanochat_checkpoint_fine_tunes_with_train_sft(nanochat_dir: tuple, tmp_path: Path) -> None:
    from nanoforge.checkpoint import load_model

    folder, _ = nanochat_dir
    import_nanochat(folder, "d2")
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"zwei {i}"},
                                                       {"role": "assistant", "content": "drei vier"}]})
                              for i in range(24)) + "\n")
    assert main(["train", "sft", "--from", "d2", "--data", str(data), "--tag", "d2-sft",
                 *(f"--set={kv}" for kv in ("train.max_steps=2", "train.eval_every=0",
                                            "train.device_batch_size=2"))]) == 0
    model, meta = load_model("d2-sft")
    assert meta["phase"] == "sft" and meta["step"] == 2
    assert model.config.mlp == "relu2" and model.config.logit_softcap == 15.0 and not model.config.norm_weights
