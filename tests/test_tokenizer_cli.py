"""`nanoforge tokenizer train → eval` through the CLI on the real German corpus, and every bad input."""

from __future__ import annotations

import json
import math
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanoforge.cli import main
from nanoforge.data.corpus import iter_documents
from nanoforge.home import tokenizer_dir
from nanoforge.tokenizer import Tokenizer


@pytest.fixture(autouse=True)
def fresh_log_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI binds its log handler to the sys.stderr of the first test; give each test its own."""
    from nanoforge import progress

    monkeypatch.setattr(progress.logger, "handlers", [])


def _write_parquet(path: Path, texts: list[str], column: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: texts}), path)
    return path


@pytest.mark.corpus
def test_train_all_backends_then_eval_writes_consistent_tables(corpus_de: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    for backend in ("rustbpe", "neox", "python"):
        assert main(["tokenizer", "train", "--data", str(corpus_de), "--vocab-size", "600", "--backend", backend,
                     "--name", f"de-{backend}", "--max-chars", "300000", "--doc-cap", "5000", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["vocab_size"] == 600 and Path(out["path"]) == tokenizer_dir(f"de-{backend}")
        assert (Path(out["path"]) / "hf" / "tokenizer.json").is_file()
    meta = Tokenizer.load("de-python").meta["training"]
    assert meta["max_chars"] == 300000 and meta["doc_cap"] == 5000 and 300000 < meta["characters"] <= 305000
    config = {f"de-{b}": {"class": "nanoforge", "path": f"de-{b}"} for b in ("rustbpe", "neox", "python")}
    config["rustbpe-hf"] = {"class": "huggingface", "path": str(tokenizer_dir("de-rustbpe") / "hf")}
    (tmp_path / "tokenizers.json").write_text(json.dumps(config))
    assert main(["tokenizer", "eval", "--config", str(tmp_path / "tokenizers.json"), "--data", str(corpus_de),
                 "--samples", "40", "--out", str(tmp_path / "eval")]) == 0
    md = capsys.readouterr().out
    for name in ("results.md", "results.tex", "results.csv", "results.json", "fertility.png",
                 "vocab_utilization.png", "type_token_ratio.png", "avg_token_length.png", "tokens_per_line.png",
                 "bytes_per_token.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0, name
    assert (tmp_path / "eval" / "fertility.png").read_bytes()[:4] == b"\x89PNG"
    assert md == (tmp_path / "eval" / "results.md").read_text() and "**" in md and "| de-neox |" in md
    assert r"\toprule" in (tmp_path / "eval" / "results.tex").read_text()
    result = json.loads((tmp_path / "eval" / "results.json").read_text())

    # Recompute the metrics directly for one nanoforge and the Hugging Face tokenizer.
    texts = list(islice((d.strip() for d in iter_documents(corpus_de) if d.strip()), 40))
    tok = Tokenizer.load("de-rustbpe")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir("de-rustbpe") / "hf"))
    for name, encode, vocab in (("de-rustbpe", tok.encode, tok.vocab_size), ("rustbpe-hf", hf.encode, len(hf.get_vocab()))):
        ids = [encode(t) for t in texts]
        s = result["summary"][name]
        assert math.isclose(s["fertility"], sum(len(i) / len(t.encode()) for i, t in zip(ids, texts)) / 40)
        seen = {x for i in ids for x in i}
        assert math.isclose(s["vocab_utilization"], len(seen) / vocab)
        assert math.isclose(s["type_token_ratio"], len(seen) / sum(map(len, ids)))
        assert math.isclose(s["avg_token_length"], sum(len(t) / len(i) for i, t in zip(ids, texts)) / 40)
        assert math.isclose(s["tokens_per_line"], sum(len(i) / len(t.split("\n")) for i, t in zip(ids, texts)) / 40)
        assert math.isclose(s["bytes_per_token"], sum(len(t.encode()) for t in texts) / sum(map(len, ids)))
    # the HF export adds BOS (its default encode), ours does not: exactly one more token per text
    assert result["summary"]["rustbpe-hf"]["tokens"] == result["summary"]["de-rustbpe"]["tokens"] + 40
    diff = result["pairwise"]["de-rustbpe - de-python"]["fertility"]
    assert diff["mean"] == 0 and diff["stderr"] == 0  # identical merges, identical numbers
    assert set(result["per_text"]["de-neox"]["fertility"]) == {"mean", "stderr"}
    assert main(["tokenizer", "eval", "--config", str(tmp_path / "tokenizers.json"), "--data", str(corpus_de),
                 "--samples", "5", "--unit", "words", "--out", str(tmp_path / "eval_w")]) == 0
    words = json.loads((tmp_path / "eval_w" / "results.json").read_text())["summary"]["de-rustbpe"]["fertility"]
    assert 1 < words < 5


def _fails(argv: list[str], capsys: pytest.CaptureFixture, *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0] and "Traceback" not in err, err
    err = errors[0]
    for n in needles:
        assert n in err, err
    return err


def _train(data: Path | str, *extra: str) -> list[str]:
    return ["tokenizer", "train", "--data", str(data), "--vocab-size", "300", "--name", "t", *extra]


def test_bad_training_inputs_end_in_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = _write_parquet(tmp_path / "good" / "shard_00000.parquet", ["Hallo Welt, wie geht es dir?"] * 20)
    _fails(_train(tmp_path / "missing"), capsys, "does not exist")
    (tmp_path / "empty").mkdir()
    _fails(_train(tmp_path / "empty"), capsys, "holds no .parquet")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "shard_00000.parquet").write_bytes(b"PAR1 this is not parquet")
    _fails(_train(tmp_path / "broken"), capsys, "not a readable parquet file")
    _write_parquet(tmp_path / "nocol" / "shard_00000.parquet", ["x"], column="content")
    _fails(_train(tmp_path / "nocol"), capsys, "no column 'text'")
    _write_parquet(tmp_path / "blank" / "shard_00000.parquet", ["", ""])
    _fails(_train(tmp_path / "blank"), capsys, "no text")
    _fails(["tokenizer", "train", "--data", str(good.parent), "--vocab-size", "260", "--name", "t"], capsys,
           "too small", "266")
    _fails(_train(good.parent, "--backend", "sentencepiece"), capsys, "unknown tokenizer backend", "rustbpe")
    _fails(["tokenizer", "train", "--data", str(good.parent), "--vocab-size", "300"], capsys, "--name")
    assert main(_train(good.parent)) == 0
    _fails(_train(good.parent), capsys, "already exists", "--force")
    assert main(_train(good.parent, "--force", "--backend", "python")) == 0
    assert Tokenizer.load("t").meta["training"]["backend"] == "python"
    assert not [p for p in tokenizer_dir("t").parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("where", ["rustbpe", "python", "neox"])
def test_interrupted_training_leaves_no_partial_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture, where: str) -> None:
    from nanoforge.tokenizer import train

    good = _write_parquet(tmp_path / "good" / "shard_00000.parquet", ["Hallo Welt, wie geht es dir?"] * 20)

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    real = getattr(train, f"_train_{where}")
    monkeypatch.setattr(train, f"_train_{where}", interrupted)
    assert main(_train(good.parent, "--backend", where)) == 130
    assert not tokenizer_dir("t").parent.exists() or not list(tokenizer_dir("t").parent.iterdir())
    # an existing tokenizer survives an interrupted --force retrain untouched
    monkeypatch.setattr(train, f"_train_{where}", real)
    assert main(_train(good.parent, "--backend", where)) == 0
    before = Tokenizer.load("t").fingerprint
    monkeypatch.setattr(train, f"_train_{where}", interrupted)
    assert main(_train(good.parent, "--backend", where, "--force")) == 130
    assert Tokenizer.load("t").fingerprint == before
    assert [p.name for p in tokenizer_dir("t").parent.iterdir()] == ["t"]


def test_bad_eval_inputs_end_in_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = _write_parquet(tmp_path / "good" / "shard_00000.parquet", ["Hallo Welt, wie geht es dir?"] * 20)
    assert main(_train(good.parent)) == 0
    cfg = tmp_path / "cfg.json"

    def ev(config: object, data: Path = good.parent) -> list[str]:
        cfg.write_text(json.dumps(config))
        return ["tokenizer", "eval", "--config", str(cfg), "--data", str(data), "--out", str(tmp_path / "o")]

    _fails(ev({"a": {"class": "nanoforge", "path": "nope"}}), capsys, "points at nothing", "'a'")
    _fails(ev({"a": {"class": "huggingface", "path": str(tmp_path / "nope")}}), capsys, "points at nothing")
    _fails(ev({"a": {"class": "spacy", "path": "t"}}), capsys, "unknown class")
    _fails(ev({}), capsys, "non-empty")
    _fails(ev({"a": {"class": "nanoforge", "path": "t"}}, tmp_path / "nodata"), capsys, "does not exist")
    _fails(["tokenizer", "eval", "--config", str(tmp_path / "none.json"), "--data", str(good.parent),
            "--out", str(tmp_path / "o")], capsys, "eval config", "does not exist")
    assert main(ev({"a": {"class": "nanoforge", "path": "t"}})) == 0
    _fails(["tokenizer", "export-hf", "nope", "--out", str(tmp_path / "x")], capsys, "no tokenizer at")


@pytest.mark.corpus
def test_ctrl_c_during_real_training_leaves_no_folder(corpus_de: Path, corpus_en: Path, nanoforge_home: Path,
                                                     tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    # de + en three times over (75 M characters) at vocab 32,768: ~10 s of work uninterrupted, so SIGINT
    # lands mid-job even when this process is scheduled late on a busy machine.
    both = tmp_path / "de+en"
    both.mkdir()
    for copy in range(3):
        for shard in [*sorted(corpus_de.glob("*.parquet")), *sorted(corpus_en.glob("*.parquet"))]:
            (both / f"{copy}_{shard.parent.name}_{shard.name}").symlink_to(shard)
    proc = subprocess.Popen([sys.executable, "-m", "nanoforge", "tokenizer", "train", "--data", str(both),
                             "--vocab-size", "32768", "--backend", "python", "--name", "big"],
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, NANOFORGE_HOME=str(nanoforge_home)))
    assert "reading shard 1/" in proc.stderr.readline() + proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert not (nanoforge_home / "tokenizers" / "big").exists()
    assert not list((nanoforge_home / "tokenizers").iterdir())
