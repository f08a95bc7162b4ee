"""Token shards: format, parallel determinism, train/val split, resume, and refusals of bad input."""

from __future__ import annotations

import filecmp
import shutil
from pathlib import Path

import numpy as np
import pytest
from _data_helpers import ByteTokenizer, documents, make_corpus, write_parquet

from nanoforge.cli import main
from nanoforge.data import shards
from nanoforge.data import tokenize as tok_mod
from nanoforge.data.tokenize import tokenize_corpus
from nanoforge.errors import UserError


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return make_corpus(tmp_path / "corpus", n_docs=240, files=3, row_group_size=16)


def _split_docs(out: Path, split: str) -> list[str]:
    """The documents of a split, decoded back to text."""
    ids = np.concatenate([shards.open_shard(p) for p in shards.shard_paths(out, split)])
    starts = np.load(out / f"{split}_docs.npy")
    ends = np.append(starts[1:], len(ids))
    tok = ByteTokenizer()
    assert (ids[starts] == tok.bos_id).all()
    return [tok.decode(ids[a + 1:b].tolist()) for a, b in zip(starts, ends)]


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir() if p.suffix in (".bin", ".npy"))
    assert names == sorted(p.name for p in b.iterdir() if p.suffix in (".bin", ".npy"))
    for n in names:
        assert filecmp.cmp(a / n, b / n, shallow=False), n


def test_one_and_two_workers_give_byte_identical_shards(corpus: Path, tmp_path: Path) -> None:
    one = tokenize_corpus(corpus, ByteTokenizer(), out=tmp_path / "w1", workers=1, shard_tokens=2000, val_docs=10)
    two = tokenize_corpus(corpus, ByteTokenizer(), out=tmp_path / "w2", workers=2, shard_tokens=2000, val_docs=10)
    assert len(shards.shard_paths(one, "train")) > 3
    _same_files(one, two)


def test_shards_have_fixed_size_and_a_header_that_matches(corpus: Path, tmp_path: Path) -> None:
    out = tokenize_corpus(corpus, ByteTokenizer(), out=tmp_path / "t", workers=1, shard_tokens=1500)
    paths = shards.shard_paths(out, "train")
    counts = [shards.read_header(p)["count"] for p in paths]
    assert counts[:-1] == [1500] * (len(paths) - 1) and 0 < counts[-1] <= 1500
    raw = paths[0].read_bytes()
    assert raw[:8] == b"NFTOKENS" and len(raw) == shards.HEADER_SIZE + 2 * 1500
    assert shards.read_meta(out)["dtype"] == "uint16"


def test_every_document_starts_with_bos_and_splits_are_whole_disjoint_documents(corpus: Path,
                                                                                   tmp_path: Path) -> None:
    out = tokenize_corpus(corpus, ByteTokenizer(), out=tmp_path / "t", workers=2, shard_tokens=1000, val_docs=25)
    train, val = _split_docs(out, "train"), _split_docs(out, "val")
    docs = documents(240)
    assert val == docs[:25]
    assert train == docs[25:]
    meta = shards.read_meta(out)
    assert meta["splits"]["val"]["documents"] == 25 and meta["documents"] == 240
    assert meta["chars"] == sum(map(len, docs))
    assert meta["bytes"] == sum(len(d.encode()) for d in docs)
    assert meta["tokens"] == meta["bytes"] + 240  # bytes + one BOS per document
    assert meta["chars_per_token"] == pytest.approx(meta["chars"] / meta["tokens"], rel=1e-3)


def test_val_fraction_takes_an_evenly_spread_share(corpus: Path, tmp_path: Path) -> None:
    out = tokenize_corpus(corpus, ByteTokenizer(), out=tmp_path / "t", workers=1, val_fraction=0.1)
    val = _split_docs(out, "val")
    docs = documents(240)
    assert val == [docs[i] for i in range(0, 240, 10)]
    assert set(val).isdisjoint(_split_docs(out, "train"))


def test_empty_documents_are_left_out(tmp_path: Path) -> None:
    write_parquet(tmp_path / "c" / "a.parquet", ["one", "", None, "  ", "two"])
    out = tokenize_corpus(tmp_path / "c", ByteTokenizer(), out=tmp_path / "t", val_docs=0)
    assert _split_docs(out, "train") == ["one", "two"]


def test_large_vocab_uses_uint32(corpus: Path, tmp_path: Path) -> None:
    class Big(ByteTokenizer):
        vocab_size = 70_000
        fingerprint = "big"
    out = tokenize_corpus(corpus, Big(), out=tmp_path / "t", workers=1)
    assert shards.read_meta(out)["dtype"] == "uint32"
    assert shards.open_shard(shards.shard_paths(out, "train")[0]).dtype == np.dtype("<u4")


def test_interrupted_run_resumes_keeping_finished_shards(corpus: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    full = tokenize_corpus(corpus, ByteTokenizer(), out=tmp_path / "full", workers=1, shard_tokens=900,
                           val_fraction=0.05)
    real_write, written = shards.write_shard, []

    def crashing_write(path, *args, **kw):  # noqa: ANN001, ANN002, ANN003
        if len(written) == 30:
            raise KeyboardInterrupt
        written.append(Path(path).name)
        real_write(path, *args, **kw)

    monkeypatch.setattr(shards, "write_shard", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(corpus, ByteTokenizer(), out=tmp_path / "part", workers=2, shard_tokens=900,
                        val_fraction=0.05)
    monkeypatch.setattr(shards, "write_shard", real_write)
    part = tmp_path / "part"
    assert not (part / "meta.json").exists()
    kept = {n: (part / n).stat().st_mtime_ns for n in written}
    with pytest.raises(UserError, match="unfinished"):
        shards.read_meta(part)
    encoded = []
    real_encode = tok_mod._encode_unit
    monkeypatch.setattr(tok_mod, "_encode_unit", lambda unit: encoded.append(unit) or real_encode(unit))
    tokenize_corpus(corpus, ByteTokenizer(), out=part, workers=1, shard_tokens=900, val_fraction=0.05)
    n_units = len(tok_mod.corpus_units(corpus)[0])
    assert 0 < len(encoded) < n_units - 3  # the finished part of the corpus is not read again
    assert {n: (part / n).stat().st_mtime_ns for n in written} == kept  # finished shards not rewritten
    _same_files(full, part)
    assert not list(part.glob(".*pending*"))


def test_finished_folder_is_returned_as_is(corpus: Path, tmp_path: Path) -> None:
    out = tokenize_corpus(corpus, ByteTokenizer(), out=tmp_path / "t", workers=1)
    stamp = (out / "meta.json").stat().st_mtime_ns
    assert tokenize_corpus(corpus, ByteTokenizer(), out=out, workers=1) == out
    assert (out / "meta.json").stat().st_mtime_ns == stamp


def test_another_tokenizer_is_refused_and_nothing_overwritten(corpus: Path, tmp_path: Path) -> None:
    out = tokenize_corpus(corpus, ByteTokenizer(), out=tmp_path / "t", workers=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    class Other(ByteTokenizer):
        fingerprint = "other"
    with pytest.raises(UserError, match="another tokenizer"):
        tokenize_corpus(corpus, Other(), out=out, workers=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(UserError, match="fingerprint"):
        shards.read_meta(out, tokenizer_fingerprint="other")
    tokenize_corpus(corpus, Other(), out=out, workers=1, force=True)
    assert shards.read_meta(out)["tokenizer_fingerprint"] == "other"


def test_shard_whose_header_disagrees_with_its_size_is_one_line_error(corpus: Path, tmp_path: Path) -> None:
    out = tokenize_corpus(corpus, ByteTokenizer(), out=tmp_path / "t", workers=1, shard_tokens=1000)
    p = shards.shard_paths(out, "train")[1]
    p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(UserError, match=r"header says 1,000 tokens .* but the file has") as e:
        shards.read_header(p)
    assert "\n" not in str(e.value)
    p.write_bytes(b"garbage")
    with pytest.raises(UserError, match="shorter than"):
        shards.read_header(p)


@pytest.mark.parametrize("case", ["truncated", "missing_column", "empty"])
def test_bad_corpus_is_refused_before_anything_is_written(tmp_path: Path, case: str) -> None:
    c = tmp_path / "c"
    if case == "truncated":
        good = write_parquet(c / "a.parquet", ["x" * 50] * 20)
        good.write_bytes(good.read_bytes()[:-30])
        match = "not a readable parquet file"
    elif case == "missing_column":
        import pyarrow as pa
        import pyarrow.parquet as pq
        c.mkdir()
        pq.write_table(pa.table({"content": ["a", "b"]}), c / "a.parquet")
        match = "no column 'text'"
    else:
        write_parquet(c / "a.parquet", ["", None, " "])
        match = "no non-empty documents"
    with pytest.raises(UserError, match=match):
        tokenize_corpus(c, ByteTokenizer(), out=tmp_path / "t", workers=1)
    assert not (tmp_path / "t" / "meta.json").exists()


def test_val_options_are_validated(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="either"):
        tokenize_corpus(corpus, ByteTokenizer(), out=tmp_path / "t", val_docs=3, val_fraction=0.1)
    with pytest.raises(UserError, match="val-fraction"):
        tokenize_corpus(corpus, ByteTokenizer(), out=tmp_path / "t", val_fraction=1.5)
    assert not (tmp_path / "t").exists()


def test_is_val_first_docs_and_fraction() -> None:
    idx = np.arange(20)
    assert tok_mod.is_val(idx, 3, None).tolist() == [True] * 3 + [False] * 17
    from fractions import Fraction
    assert np.flatnonzero(tok_mod.is_val(idx, None, Fraction(1, 4))).tolist() == [0, 4, 8, 12, 16]


def test_cli_header_error_exits_2_in_one_line(corpus: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tokenize_corpus(corpus, ByteTokenizer(), out=tmp_path / "t", workers=1, shard_tokens=1000)
    p = shards.shard_paths(out, "train")[0]
    p.write_bytes(p.read_bytes()[:100])
    shutil.copy(p, tmp_path / "copy.bin")
    from nanoforge.data.loader import TokenLoader
    with pytest.raises(UserError, match="header says"):
        TokenLoader(out, "train", 2, 16)
    assert main(["data", "inspect", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_txt_and_jsonl_corpora_tokenize_like_the_reader_sees_them(tmp_path: Path) -> None:
    c = tmp_path / "c"
    c.mkdir()
    (c / "a.txt").write_text("block one\n\nblock two\n", encoding="utf-8")
    (c / "b.jsonl").write_text('{"body": "json doc"}\n{"body": "zweites Dokument"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="no field 'text'"):
        tokenize_corpus(c, ByteTokenizer(), out=tmp_path / "t0", workers=2)
    (c / "b.jsonl").write_text('{"text": "json doc"}\n{"text": "zweites Dokument"}\n', encoding="utf-8")
    out = tokenize_corpus(c, ByteTokenizer(), out=tmp_path / "t", workers=2, val_docs=0, split_blank_lines=True)
    assert _split_docs(out, "train") == ["block one", "block two", "json doc", "zweites Dokument"]


def test_corpus_and_output_by_name_under_the_data_home(nanoforge_home: Path) -> None:
    make_corpus(nanoforge_home / "corpora" / "tiny", n_docs=50, files=1)
    out = tokenize_corpus("tiny", ByteTokenizer(), name="tiny-bytes", workers=1, val_docs=5)
    assert out == nanoforge_home / "tokens" / "tiny-bytes"
    assert shards.read_meta("tiny-bytes")["splits"]["val"]["documents"] == 5


def test_killed_worker_stops_the_run_with_one_error_and_a_rerun_resumes(corpus: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """multiprocessing.Pool would replace a killed worker and wait forever for its lost result."""
    import contextlib
    import multiprocessing
    import os
    import signal

    from nanoforge.workers import WorkerDied

    full = tokenize_corpus(corpus, ByteTokenizer(), out=tmp_path / "full", workers=1, shard_tokens=900)
    real_write = shards.write_shard

    def kill_workers_then_write(path, *args, **kw):  # noqa: ANN001, ANN002, ANN003
        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):  # one that ended between listing and kill
                os.kill(child.pid, signal.SIGKILL)
        real_write(path, *args, **kw)

    monkeypatch.setattr(shards, "write_shard", kill_workers_then_write)
    with pytest.raises(WorkerDied, match=r"tokenize .*: a worker process ended abruptly \(.*SIGKILL.*\); the finished shards are kept"):
        tokenize_corpus(corpus, ByteTokenizer(), out=tmp_path / "part", workers=2, shard_tokens=900)
    monkeypatch.setattr(shards, "write_shard", real_write)
    assert not (tmp_path / "part" / "meta.json").exists()
    tokenize_corpus(corpus, ByteTokenizer(), out=tmp_path / "part", workers=2, shard_tokens=900)
    _same_files(full, tmp_path / "part")
