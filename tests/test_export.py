"""Hugging Face export/import: transformers gives our logits (≤ 1e-4) and greedy tokens, import of a random
LlamaForCausalLM round-trips, export → import → export is byte-identical, bad input is one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _eval_helpers import make_checkpoint, make_tokenizer

from nanoforge.cli import main
from nanoforge.errors import UserError
from nanoforge.export.hf import export_hf, import_hf
from nanoforge.infer.engine import generate_ids, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def train_briefly(ckpt: Path, steps: int = 30) -> Path:
    """A few AdamW steps on the tokenizer's own text, saved as the checkpoint's latest step: parity is
    checked on a trained model, not only on random weights."""
    from nanoforge.checkpoint import save_checkpoint

    model, tok, meta = load_checkpoint(ckpt)
    text = (Path(meta["tokenizer"]["path"]).parent / "text" / "docs.txt").read_text(encoding="utf-8")
    ids = torch.tensor(tok.encode(text, bos=True))
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=gen)
        x = torch.stack([ids[i:i + 64] for i in starts])
        y = torch.stack([ids[i + 1:i + 65] for i in starts])
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
    save_checkpoint(ckpt, meta["step"] + steps, model, None, meta)
    return ckpt


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tok_path: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(root, tok_path, pad_vocab_to=100)  # 402 -> 500 rows; padding is dropped in the export
    return train_briefly(ckpt), export_hf(ckpt, root / "hf")


def _hf(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_transformers_logits_and_greedy_match(tmp_path: Path, tok_path: Path, exported: tuple, tie: bool) -> None:
    ckpt, out = exported if not tie else (None, None)
    if tie:
        ckpt = make_checkpoint(tmp_path, tok_path, tie=True, n_kv_heads=4, seed=1)
        out = export_hf(ckpt, tmp_path / "hf")
    model, tok, _ = load_checkpoint(ckpt)
    hf = _hf(out)
    ids = tok.encode("der Hund sieht die Katze und läuft schnell", bos=True)
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (model(x) - hf(x).logits).abs().max().item()
    assert diff <= 1e-4
    hf.generation_config.eos_token_id = None
    theirs = hf.generate(x, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    assert list(generate_ids(model, ids, max_new_tokens=12)) == theirs


def test_export_config_is_explicit_and_tokenizer_matches(exported: tuple) -> None:
    from transformers import AutoTokenizer

    ckpt, out = exported
    cfg = json.loads((out / "config.json").read_text())
    for key in ("rms_norm_eps", "head_dim", "num_key_value_heads", "tie_word_embeddings", "rope_theta",
                "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id", "vocab_size",
                "max_position_embeddings", "hidden_act", "attention_bias", "mlp_bias", "torch_dtype"):
        assert key in cfg, key
    assert cfg["num_key_value_heads"] == 2 and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": cfg["rope_theta"]}
    gen = json.loads((out / "generation_config.json").read_text())
    model, tok, _ = load_checkpoint(ckpt)
    assert model.config.padded_vocab_size > tok.vocab_size == cfg["vocab_size"]
    assert cfg["tie_word_embeddings"] is False
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:  # padding rows dropped
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [tok.vocab_size, 64]
        assert f.get_slice("lm_head.weight").get_shape() == [tok.vocab_size, 64]
    assert gen["bos_token_id"] == tok.bos_id == cfg["bos_token_id"]
    text = "die Sonne ist groß und der Mond ist klein"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == tok.encode(text, bos=True)


def test_export_refuses_existing_folder_unless_force(exported: tuple, capsys: pytest.CaptureFixture) -> None:
    ckpt, out = exported
    before = (out / "model.safetensors").read_bytes()
    assert main(["export", "hf", str(ckpt), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "hf", str(ckpt), "--out", str(out), "--force"]) == 0
    assert (out / "model.safetensors").read_bytes() == before


def test_export_bfloat16(exported: tuple, tmp_path: Path) -> None:
    ckpt, _ = exported
    out = export_hf(ckpt, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert next(_hf(out).parameters()).dtype == torch.float32  # loaded as asked; weights were bf16 on disk
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16


def test_import_random_llama_and_round_trip(tmp_path: Path, tok_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from nanoforge.tokenizer import Tokenizer
    from nanoforge.tokenizer.hf import export_hf as export_tokenizer

    tok = Tokenizer.load(tok_path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rms_norm_eps=1e-6, rope_theta=5000.0, tie_word_embeddings=False,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    ref = LlamaForCausalLM(cfg).eval()
    src = tmp_path / "src"
    ref.save_pretrained(src, max_shard_size="100KB")  # sharded: model.safetensors.index.json
    assert (src / "model.safetensors.index.json").is_file()
    export_tokenizer(tok, src)
    ckpt = import_hf(src, "imported")
    model, _, meta = load_checkpoint(ckpt)
    x = torch.tensor([tok.encode("zwei drei vier", bos=True)])
    with torch.no_grad():
        assert (model(x) - ref(x).logits).abs().max().item() <= 1e-4
    a = export_hf(ckpt, tmp_path / "a")
    b = export_hf(import_hf(a, "again"), tmp_path / "b")
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_import_refuses_non_llama_and_unsupported_features(tmp_path: Path, exported: tuple) -> None:
    _, out = exported
    for change, needle in (({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "cannot be imported"),
                           ({"attention_bias": True}, "attention_bias"),
                           ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_type=linear"),
                           ({"hidden_size": None}, "invalid value")):
        src = tmp_path / needle.split()[0].replace("=", "_")
        src.mkdir()
        for f in out.iterdir():
            (src / f.name).write_bytes(f.read_bytes())
        cfg = json.loads((out / "config.json").read_text())
        cfg.update(change)
        (src / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(UserError, match=needle):
            import_hf(src, "bad")


def test_corrupt_safetensors_is_one_line_exit_2(tmp_path: Path, exported: tuple,
                                                capsys: pytest.CaptureFixture) -> None:
    _, out = exported
    src = tmp_path / "corrupt"
    src.mkdir()
    for f in out.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 3])
    assert main(["import", "hf", str(src), "--tag", "broken"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and err.count("\n") == 1


def test_export_defaults_to_home_exports_tag(tok_path: Path, nanoforge_home: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    make_checkpoint(nanoforge_home / "checkpoints" / "base", tok_path, name="demo")
    assert main(["export", "hf", "demo", "--json"]) == 0  # a bare tag name means checkpoints/<phase>/<tag>
    info = json.loads(capsys.readouterr().out)
    assert info["export"] == str(nanoforge_home / "exports" / "demo") and info["step"] == 10
    assert (nanoforge_home / "exports" / "demo" / "model.safetensors").is_file()


def test_import_without_tokenizer_files_records_none(tmp_path: Path, exported: tuple, tok_path: Path) -> None:
    _, out = exported
    src = tmp_path / "weights_only"
    src.mkdir()
    for name in ("config.json", "model.safetensors"):
        (src / name).write_bytes((out / name).read_bytes())
    ckpt = import_hf(src, "bare")
    meta = json.loads(next(ckpt.glob("meta_*.json")).read_text())
    assert meta["tokenizer"] is None and meta["imported_from"] == str(src.resolve())
    with pytest.raises(UserError, match="--tokenizer"):
        load_checkpoint(ckpt)
    model, tok, _ = load_checkpoint(ckpt, tokenizer=str(tok_path))
    assert model.config.vocab_size == tok.vocab_size and model.config.pad_vocab_to == 0


def test_export_refuses_tokenizer_larger_than_model(tmp_path: Path, tok_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    from nanoforge.checkpoint import save_checkpoint
    from nanoforge.model import LLaMA, ModelConfig
    from nanoforge.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_path)
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16, ffn_dim=64,
                      vocab_size=tok.vocab_size - 10, max_seq_len=64)
    meta = {"model_config": cfg.to_dict(), "tokenizer": {"path": str(tok_path), "fingerprint": tok.fingerprint}}
    save_checkpoint(tmp_path / "small", 1, LLaMA(cfg), None, meta)
    assert main(["export", "hf", str(tmp_path / "small"), "--out", str(tmp_path / "out")]) == 2
    assert "tokens without embeddings" in capsys.readouterr().err and not (tmp_path / "out").exists()
