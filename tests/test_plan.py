"""`nanoforge plan`: Chinchilla-style token, character, shard and FLOP budgets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from _data_helpers import make_corpus

from nanoforge.cli import main
from nanoforge.data.commands import parse_count
from nanoforge.errors import UserError
from nanoforge.plan import human, make_plan


def test_reproduces_the_reference_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--params", "156M", "--params", "561M", "--params", "1.5B"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()[2:]]
    cells = [[c.strip() for c in r[1:5]] for r in rows]
    assert cells == [["156M", "3.1B", "15B", "60"], ["561M", "11.2B", "54B", "216"], ["1.5B", "30B", "144B", "576"]]


def test_json_has_exact_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--params", "561M", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["tokens"] == 11_220_000_000 and row["chars"] == 53_856_000_000 and row["shards"] == 216
    assert row["flops"] == pytest.approx(6 * 561e6 * 11.22e9)


def test_ratio_and_overrides() -> None:
    plan = make_plan([("x", 1_000_000)], ratio=10, chars_per_token=2.0, chars_per_shard=1_000_000)
    assert plan["rows"][0]["tokens"] == 10_000_000 and plan["rows"][0]["shards"] == 20


def test_measures_chars_per_shard_on_a_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = make_corpus(tmp_path / "c", n_docs=100, files=2)
    assert main(["plan", "--params", "1M", "--corpus", str(corpus), "--chars-per-token", "4", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    from nanoforge.data.corpus import iter_documents
    total = sum(len(t) for t in iter_documents(corpus))
    assert plan["chars_per_shard"] == pytest.approx(total / 2)
    assert plan["rows"][0]["shards"] == math.ceil(80_000_000 / (total / 2))


def test_preset_uses_the_model_parameter_count(capsys: pytest.CaptureFixture[str]) -> None:
    from nanoforge.config import preset_model

    n = preset_model("d12").num_params()
    assert main(["plan", "--preset", "d12", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["model"] == "d12" and row["params"] == n and row["tokens"] == 20 * n


@pytest.mark.parametrize("argv,match", [
    (["plan"], "--params"),
    (["plan", "--params", "12Q"], "not a number"),
    (["plan", "--params", "0"], "positive"),
    (["plan", "--params", "1M", "--tokenizer", "x"], "both --tokenizer and --corpus"),
    (["plan", "--preset", "no-such-preset"], "no-such-preset"),
])
def test_bad_arguments_exit_2_in_one_line(argv: list[str], match: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


def test_parse_count_and_human() -> None:
    assert parse_count("561M") == 561_000_000 and parse_count("1.5B") == 1_500_000_000
    assert parse_count("125000000") == 125_000_000 and parse_count("2e3") == 2000
    with pytest.raises(UserError):
        parse_count("many")
    assert human(3.12e9) == "3.1B" and human(30e9) == "30B" and human(14.976e9, 0) == "15B"
