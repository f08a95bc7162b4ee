"""`nanoforge data import`: own text files to standard parquet shards."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from _data_helpers import write_parquet

from nanoforge.cli import main
from nanoforge.data.corpus import iter_documents
from nanoforge.data.importer import import_documents
from nanoforge.errors import UserError


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("first block\nstill first\n\nsecond block\n\n\nthird\n", encoding="utf-8")
    (src / "b.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in ["json one", "", "json two",
                                                                              "second block"]) + "\n")
    write_parquet(src / "c.parquet", ["pq one", None, "json one"])
    return src


def _texts(folder: Path) -> list[str]:
    return list(iter_documents(folder))


def test_import_txt_and_parquet_in_path_order(sources: Path, tmp_path: Path) -> None:
    (sources / "b.jsonl").unlink()
    out = import_documents(sources, tmp_path / "out", split_blank_lines=True, shard_chars=30)
    assert _texts(out) == ["first block\nstill first", "second block", "third", "pq one", "json one"]


def test_import_fields_blocks_dedup_and_empty_counts(tmp_path: Path, sources: Path) -> None:
    (sources / "c.parquet").unlink()
    out = import_documents(sources, tmp_path / "out", column="body", split_blank_lines=True, dedup=True,
                           shard_chars=25)
    assert _texts(out) == ["first block\nstill first", "second block", "third", "json one", "json two"]
    summary = json.loads((out / ".import.json").read_text())
    assert summary["dropped_empty"] == 1 and summary["dropped_duplicates"] == 1 and summary["documents"] == 5
    files = sorted(p.name for p in out.glob("*.parquet"))
    assert files == [f"shard_{i:05d}.parquet" for i in range(len(files))] and len(files) > 1
    meta = pq.ParquetFile(out / files[0])
    assert meta.schema_arrow.names == ["text"]
    assert meta.metadata.row_group(0).column(0).compression == "ZSTD"


def test_import_is_deterministic(tmp_path: Path, sources: Path) -> None:
    (sources / "b.jsonl").unlink()
    a = import_documents(sources, tmp_path / "a", split_blank_lines=True)
    b = import_documents(sources, tmp_path / "b", split_blank_lines=True)
    assert (a / "shard_00000.parquet").read_bytes() == (b / "shard_00000.parquet").read_bytes()


def test_existing_output_is_not_overwritten(tmp_path: Path, sources: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["data", "import", str(sources / "a.txt"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "already exists" in err and err.count("\n") == 1
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("case", ["corrupt", "missing_column", "empty"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, case: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    if case == "corrupt":
        p = write_parquet(src / "x.parquet", ["some text"] * 50)
        p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
        match = "not a readable parquet file"
    elif case == "missing_column":
        (src).mkdir()
        (src / "x.jsonl").write_text('{"body": "a"}\n')
        match = "no field 'text'"
    else:
        src.mkdir()
        (src / "x.txt").write_text("  \n\n")
        match = "no documents"
    rc = main(["data", "import", str(src), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError):
        import_documents(src, tmp_path / "out2")


def test_cli_import_prints_summary(tmp_path: Path, sources: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["data", "import", str(sources / "a.txt"), "--out", str(tmp_path / "o"), "--split-blank-lines",
               "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["documents"] == 3
