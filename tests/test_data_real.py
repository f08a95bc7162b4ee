"""The data stage with a real trained tokenizer on the shared German corpus, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nanoforge.cli import main
from nanoforge.data import shards
from nanoforge.data.corpus import iter_documents
from nanoforge.data.loader import TokenLoader

pytestmark = pytest.mark.corpus
CORPUS_DE = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "de"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not CORPUS_DE.is_dir():
        pytest.skip(f"needs the shared corpus at {CORPUS_DE} (absent in a plain clone)")
    from nanoforge.tokenizer.train import train_tokenizer

    return Path(train_tokenizer([str(CORPUS_DE)], vocab_size=512, backend="rustbpe",
                                      out=tmp_path_factory.mktemp("tok") / "de512", max_chars=300_000))


@pytest.fixture(scope="module")
def tokens_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokens") / "de512"
    assert main(["data", "tokenize", "--corpus", str(CORPUS_DE), "--tokenizer", str(tokenizer_dir),
                 "--out", str(out), "--val-docs", "50", "--workers", "2", "--shard-tokens", "1M"]) == 0
    return out


def test_cli_tokenize_round_trips_documents_with_the_real_tokenizer(tokens_dir: Path, tokenizer_dir: Path) -> None:
    from nanoforge.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    meta = shards.read_meta(tokens_dir, tokenizer_fingerprint=tok.fingerprint)
    docs = list(iter_documents(CORPUS_DE))
    assert meta["documents"] == len(docs) and meta["splits"]["val"]["documents"] == 50
    assert meta["vocab_size"] == tok.vocab_size and meta["bos_id"] == tok.bos_id and meta["dtype"] == "uint16"
    assert meta["chars"] == sum(map(len, docs))
    ids = np.concatenate([shards.open_shard(p) for p in shards.shard_paths(tokens_dir, "val")])
    starts = np.load(tokens_dir / "val_docs.npy")
    assert tok.decode(ids[starts[3] + 1:starts[4]].tolist()) == docs[3]
    assert 1.5 < meta["chars_per_token"] < 5


def test_loader_on_real_shards_checks_the_tokenizer(tokens_dir: Path, tokenizer_dir: Path) -> None:
    from nanoforge.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    loader = TokenLoader(tokens_dir, "train", batch_size=4, seq_len=128, layout="bos_aligned",
                         tokenizer_fingerprint=tok.fingerprint)
    x, y, _ = next(loader)
    assert (x[:, 0] == tok.bos_id).all() and int(x.max()) < tok.vocab_size


def test_cli_json_and_inspect(tokens_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "inspect", str(tokens_dir), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["splits"]["train"]["shards"] >= 2


def test_plan_measures_chars_per_token_with_the_tokenizer(tokenizer_dir: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--params", "5M", "--tokenizer", str(tokenizer_dir), "--corpus", str(CORPUS_DE),
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert 1.5 < plan["chars_per_token"] < 5 and plan["measured"]["chars_per_shard"] > 5_000_000


def test_one_and_two_workers_identical_with_the_real_tokenizer(tokenizer_dir: Path, tmp_path: Path) -> None:
    from nanoforge.data.tokenize import tokenize_corpus

    shard = CORPUS_DE / "shard_00000.parquet"
    outs = [tokenize_corpus([shard], str(tokenizer_dir), out=tmp_path / f"w{w}", workers=w,
                            shard_tokens=300_000, val_fraction=0.02) for w in (1, 2)]
    names = sorted(p.name for p in outs[0].iterdir() if p.suffix in (".bin", ".npy"))
    assert len(names) > 4
    for n in names:
        assert (outs[0] / n).read_bytes() == (outs[1] / n).read_bytes(), n
