"""Pipeline building blocks: the stdlib corpus, stage skipping by fingerprint, grids, tables, the HTML report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from nanoforge.cli import main
from nanoforge.data.corpus import iter_documents
from nanoforge.errors import UserError
from nanoforge.pipeline.ablate import cell_name, cells, comparison_table, load_grid
from nanoforge.pipeline.report import markdown_to_html
from nanoforge.pipeline.stages import StageRunner
from nanoforge.pipeline.stdlib_corpus import META, VERSION, build_stdlib_corpus

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_stdlib_corpus_is_deterministic_and_nontrivial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOFORGE_TEST_TOKEN", "tok-5e3c7a91")  # a user's secret must never reach the text
    a = build_stdlib_corpus(tmp_path / "a")
    b = build_stdlib_corpus(tmp_path / "b")
    docs_a, docs_b = list(iter_documents(a)), list(iter_documents(b))
    assert docs_a == docs_b
    assert len(docs_a) > 200
    assert sum(map(len, docs_a)) > 1_000_000
    assert sorted(p.name for p in a.glob("*.parquet")) == sorted(p.name for p in b.glob("*.parquet"))
    json_doc = next(d for d in docs_a if d.startswith("Module json\n"))
    assert "JSON" in json_doc and "dumps(" in json_doc
    assert not any(d.startswith(("Module antigravity", "Module this\n", "Module tkinter")) for d in docs_a)
    assert not any(" at 0x" in d for d in docs_a)  # no memory addresses: they would break determinism
    text = "\n".join(docs_a)
    assert "tok-5e3c7a91" not in text
    cgi = next((d for d in docs_a if d.startswith("Module cgi\n")), None)  # removed in Python 3.13
    assert cgi is None or "environ=os.environ" in cgi  # FieldStorage's default, shown by name
    assert sys.executable not in text and str(Path(__file__).resolve().parents[1]) not in text
    meta = json.loads((a / META).read_text())
    assert meta["documents"] == len(docs_a) and meta["version"] == VERSION
    del meta["version"]  # a corpus from before version 2 (which could hold the environment) is rebuilt
    (a / META).write_text(json.dumps(meta))
    build_stdlib_corpus(a)
    assert json.loads((a / META).read_text())["version"] == VERSION


def test_stage_is_skipped_while_inputs_and_outputs_match(tmp_path: Path) -> None:
    calls: list[str] = []
    out = tmp_path / "artifact.txt"

    def make(fp: str) -> dict:
        calls.append(fp)
        out.write_text("x")
        return {"outputs": [str(out)], "value": 1}

    first = StageRunner("r1").stage("tok", {"vocab": 512}, make)
    again = StageRunner("r2").stage("tok", {"vocab": 512}, make)  # another run shares the record
    assert (first.skipped, again.skipped) == (False, True)
    assert again.result["value"] == 1 and len(calls) == 1

    changed = StageRunner("r1").stage("tok", {"vocab": 1024}, make)
    assert not changed.skipped and len(calls) == 2 and changed.fingerprint != first.fingerprint

    out.unlink()  # a record whose outputs are gone does not count
    assert not StageRunner("r1").stage("tok", {"vocab": 512}, make).skipped
    assert len(calls) == 3

    fresh = StageRunner("r1", fresh=True)
    assert not fresh.stage("tok", {"vocab": 512}, make).skipped
    shared = StageRunner("r3", fresh=True, done_now=fresh.done_now)  # fresh redoes a shared stage once
    assert shared.stage("tok", {"vocab": 512}, make).skipped
    assert len(calls) == 4
    state = json.loads((StageRunner("r3").run_dir / "stages.json").read_text())
    assert state["stages"]["tok"]["skipped"] is True


def test_example_grid_expands_to_four_cells() -> None:
    base, axes = load_grid(EXAMPLES / "ablate-tokenizer-lr.toml")
    assert base["preset"] == "cpu-demo"
    grid = cells(axes)
    assert len(grid) == 4
    assert grid[0] == {"tokenizer.backend": "rustbpe", "train.lr": 3e-3}
    assert len({cell_name(c) for c in grid}) == 4


@pytest.mark.parametrize("text, message", [
    ("[base]\npreset = 'ci'\n", "no [axes]"),
    ("[axes]\n'train.lr' = []\n", "non-empty list"),
    ("[base]\nwhat = 1\n[axes]\n'train.lr' = [1e-3]\n", "unknown [base] key"),
    ("[axes\n", "not valid TOML"),
])
def test_bad_grid_is_refused_with_one_line(tmp_path: Path, text: str, message: str) -> None:
    grid = tmp_path / "grid.toml"
    grid.write_text(text)
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        load_grid(grid)


def test_ablate_cli_refuses_unknown_config_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid = tmp_path / "grid.toml"
    grid.write_text("[base]\npreset = 'ci'\n[axes]\n'train.learning_rate' = [1e-3, 2e-3]\n")
    assert main(["ablate", str(grid)]) == 2
    assert "unknown key 'train.learning_rate'" in capsys.readouterr().err


def test_speedrun_cli_refuses_unknown_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["speedrun", "--preset", "no-such-preset"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_comparison_table_bolds_best_and_flags_within_stderr() -> None:
    def cell(name: str, lr: float, bpb: float, acc: float) -> dict:
        return {"name": name, "values": {"train.lr": lr},
                "summary": {"val_bpb": bpb, "bytes_per_token": 3.0, "tasks": {"demo acc": acc},
                            "tasks_stderr": {"demo acc": 0.05}}}

    table = comparison_table([cell("a", 1e-3, 2.0, 0.50), cell("b", 2e-3, 1.9, 0.47), cell("c", 3e-3, 2.1, 0.30)],
                             ["train.lr"])
    lines = table["md"].splitlines()
    assert lines[0] == "| lr | bytes/token | val bpb | demo acc | Avg |"
    assert "**1.9000**" in lines[3]                # lowest bpb is best
    assert "**0.5000**" in lines[2]                # highest accuracy is best
    assert "0.4700 ~" in lines[3]                  # within one stderr of the best
    assert "0.3000 ~" not in lines[4] and "0.3000" in lines[4]
    assert table["csv"].splitlines()[0] == "lr,bytes/token,val bpb,demo acc,Avg"


def test_html_report_inlines_images(tmp_path: Path) -> None:
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "loss.png").write_bytes(b"\x89PNG fake")
    page = markdown_to_html("# T\n\n| a | b |\n|---|---|\n| **1** | `x` |\n\n![loss](plots/loss.png)\n", tmp_path)
    assert "<h1>T</h1>" in page and "<b>1</b>" in page and "<code>x</code>" in page
    assert "data:image/png;base64," in page and "plots/loss.png" not in page


def test_speedrun_cli_refuses_malformed_hub_source(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["speedrun", "--preset", "ci", "--data", "hf:no-owner"]) == 2
    assert "hf:OWNER/NAME" in capsys.readouterr().err
