"""`nanoforge tokenizer eval` gives GerTokEval's numbers: its text units, its line count, its formulas for
fertility, utilisation, TTR, token length, tokens per line, Rényi entropies, compression ratio, average token
rank and the Tokenizer Fairness Gini across datasets. The expected values are computed here the way
GerTokEval (stefan-it/german-tokenizer-benchmark) computes them: pandas loading, numpy means, its loops."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanoforge.cli import main
from nanoforge.tokenizer import Tokenizer
from nanoforge.tokenizer.hf import export_hf
from nanoforge.tokenizer.train import train_tokenizer

EDGE = ["   Leerzeichen am Anfang und am Ende   ", "", "   \n\t ", "Zeile eins\u2028noch Zeile eins\nZeile zwei",
        "Wagen\rRücklauf\r\nund Windows", "\x0cSeitenvorschub\x0c mitten\x0c", "nan",
        "Größere Städte wie München, Köln und Düsseldorf liegen am Rhein oder an der Isar.",
        "Ein Text\n\nmit Leerzeile\n", "\ufeffBOM vorne", "Ende."]
GERMAN = ["Die Katze sitzt auf der Matte und schaut aus dem Fenster.", "Heute regnet es in Berlin schon wieder.",
          "Der Bundestag hat am Donnerstag ein neues Gesetz beschlossen.", "Im Winter fällt oft Schnee in den Alpen.",
          "Wissenschaftler untersuchen die Wirkung von Kaffee auf das Gedächtnis."]


@pytest.fixture(autouse=True)
def fresh_log_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI binds its log handler to the sys.stderr of the first test; give each test its own."""
    from nanoforge import progress

    monkeypatch.setattr(progress.logger, "handlers", [])


def _parquet(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts}), path)
    return path


@pytest.fixture
def tokenizers(tmp_path: Path) -> tuple[Path, Tokenizer, object]:
    """A small python-backend tokenizer, its HF export (which adds BOS), and the eval config naming both."""
    _parquet(tmp_path / "train" / "a.parquet", (GERMAN + EDGE) * 20)
    path = train_tokenizer(tmp_path / "train", vocab_size=320, backend="python", name="small")
    tok = Tokenizer.load(path)
    export_hf(tok, tmp_path / "hf")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    cfg = tmp_path / "tokenizers.json"
    cfg.write_text(json.dumps({"small": {"class": "nanoforge", "path": "small"},
                               "small-hf": {"class": "huggingface", "path": str(tmp_path / "hf")}}))
    return cfg, tok, hf


def gertokeval_texts(parquet: Path, n: int) -> list[str]:
    """multilingual_data.load_from_parquet: pandas, str(row).strip(), empty and 'nan' dropped, first n."""
    texts = []
    for _, row in pd.read_parquet(parquet).iterrows():
        if len(texts) >= n:
            break
        text = str(row["text"]).strip()
        if text and text != "nan":
            texts.append(text)
    return texts


def gertokeval_metrics(texts: list[str], ids: list[list[int]], vocab: int, cost: str = "lines") -> dict:
    """metrics/basic.py and metrics/information_theoretic.py, with GerTokEval's default measurement configs
    (bytes for fertility; one 'line' per text for the information-theoretic metrics)."""
    unit = (lambda t: 1) if cost == "lines" else (lambda t: len(t.encode("utf-8")))
    fert = [len(i) / len(t.encode("utf-8")) for t, i in zip(texts, ids) if t and len(t.encode("utf-8")) > 0]
    length = [len(t) / len(i) for t, i in zip(texts, ids) if t and i]
    tpl = [len(i) / len(t.split("\n")) for t, i in zip(texts, ids) if t and i]
    comp = [unit(t) / len(i) for t, i in zip(texts, ids) if t and t.strip() and i]
    flat = [x for i in ids for x in i]
    counts = Counter(flat)
    p = np.array([c / len(flat) for c in counts.values()])
    out = {"fertility": np.mean(fert), "avg_token_length": np.mean(length), "tokens_per_line": np.mean(tpl),
           "vocab_utilization": len(set(flat)) / vocab, "type_token_ratio": len(set(flat)) / len(flat),
           "compression_ratio": np.mean(comp), "renyi_1.0": -sum(x * np.log2(x) for x in p)}
    for a in (2.0, 2.5, 3.0):
        out[f"renyi_{a}"] = (1 / (1 - a)) * np.log2(sum(x ** a for x in p))
    rank = {t: r + 1 for r, (t, _) in enumerate(counts.most_common())}
    out["avg_token_rank"] = np.mean([rank[t] for t in flat])
    return out


def test_edge_cases_give_gertokevals_numbers(tokenizers: tuple, tmp_path: Path) -> None:
    cfg, tok, hf = tokenizers
    data = _parquet(tmp_path / "eval" / "edge.parquet", EDGE + GERMAN)
    assert main(["tokenizer", "eval", "--config", str(cfg), "--data", str(data.parent), "--samples", "9",
                 "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    texts = gertokeval_texts(data, 9)
    # the empty row, the whitespace-only row and "nan" are not text units and do not count against --samples
    assert len(texts) == 9 and result["samples"] == 9 and texts[0] == "Leerzeichen am Anfang und am Ende"
    assert "\u2028" in texts[1] and "\r" in texts[2] and len(texts[1].split("\n")) != len(texts[1].splitlines())
    for name, encode, vocab in (("small", tok.encode, tok.vocab_size), ("small-hf", hf.encode, len(hf.get_vocab()))):
        expected = gertokeval_metrics(texts, [encode(t) for t in texts], vocab)
        got = result["summary"][name]
        for metric, value in expected.items():
            assert abs(got[metric] - value) <= 1e-9 * max(1.0, abs(value)), (name, metric, got[metric], value)
    assert result["summary"]["small-hf"]["tokens"] == result["summary"]["small"]["tokens"] + 9  # BOS
    md = (tmp_path / "out" / "results.md").read_text()
    assert "lower for Fertility, Tokens/line" in md and "--gertokeval-bold" in md
    assert (tmp_path / "out" / "renyi_2.5.png").read_bytes()[:4] == b"\x89PNG"


def test_gertokeval_bold_bolds_the_highest_tokens_per_line(tokenizers: tuple, tmp_path: Path) -> None:
    from nanoforge.tokenizer.metrics import evaluate_tokenizers

    cfg, _, _ = tokenizers
    data = _parquet(tmp_path / "eval" / "g.parquet", GERMAN)
    ours = evaluate_tokenizers(cfg, data)
    theirs = evaluate_tokenizers(cfg, data, gertokeval_bold=True)
    col = 2 + 5  # | name | vocab | fertility ... tokens/line
    rows = {r.split("|")[1].strip(): r.split("|")[col].strip() for r in ours["tables"]["md"].splitlines()[2:4]}
    high = max(ours["summary"], key=lambda n: ours["summary"][n]["tokens_per_line"])  # the HF one: +BOS
    assert high == "small-hf" and not rows[high].startswith("**") and rows["small"].startswith("**")
    rows = {r.split("|")[1].strip(): r.split("|")[col].strip() for r in theirs["tables"]["md"].splitlines()[2:4]}
    assert rows[high].startswith("**") and not rows["small"].startswith("**")
    assert "as GerTokEval's tables do" in theirs["tables"]["md"] and theirs["summary"] == ours["summary"]


def test_two_datasets_give_the_hand_computed_gini(tokenizers: tuple, tmp_path: Path) -> None:
    cfg, tok, hf = tokenizers
    a = _parquet(tmp_path / "ds" / "news" / "a.parquet", GERMAN * 2)
    b = _parquet(tmp_path / "ds" / "edge" / "b.parquet", EDGE)
    datasets = tmp_path / "ds" / "dataset-configs.json"
    datasets.write_text(json.dumps({"languages": {
        "news": {"name": "News", "iso_code": "de", "data_path": "news"},  # relative to the config file
        "edge": {"name": "Edge cases", "iso_code": "de", "data_path": str(b.parent)}}}))
    for cost_unit in ("texts", "bytes"):
        out = tmp_path / f"out-{cost_unit}"
        assert main(["tokenizer", "eval", "--config", str(cfg), "--datasets", str(datasets), "--cost-unit", cost_unit,
                     "--out", str(out)]) == 0
        result = json.loads((out / "results.json").read_text())
        groups = {"news": gertokeval_texts(a, 10**6), "edge": gertokeval_texts(b, 10**6)}
        unit = (lambda t: 1) if cost_unit == "texts" else (lambda t: len(t.encode("utf-8")))
        for name, encode, vocab in (("small", tok.encode, tok.vocab_size), ("small-hf", hf.encode, len(hf))):
            c = [sum(len(encode(t)) for t in g) / sum(unit(t) for t in g) for g in groups.values()]
            hand = abs(c[0] - c[1]) / (2 * (c[0] + c[1]))  # 2|c1 - c2| / (2 * 2^2 * (c1 + c2) / 2)
            assert abs(result["gini"][name]["gini"] - hand) < 1e-12 and hand > 1e-3
            assert abs(result["summary"][name]["gini"] - hand) < 1e-12
            lorenz = result["gini"][name]["lorenz"]
            assert lorenz["x"] == [0.0, 0.5, 1.0] and abs(lorenz["y"][1] - min(c) / sum(c)) < 1e-12
            for key, texts in groups.items():  # per-dataset tables hold each dataset's own numbers
                expected = gertokeval_metrics(texts, [encode(t) for t in texts], vocab,
                                              "lines" if cost_unit == "texts" else "bytes")
                got = result["datasets"][key]["summary"][name]
                for metric, value in expected.items():
                    assert abs(got[metric] - value) <= 1e-9 * max(1.0, abs(value)), (key, metric)
            pooled = [t for g in groups.values() for t in g]
            assert abs(result["summary"][name]["fertility"]
                       - gertokeval_metrics(pooled, [encode(t) for t in pooled], vocab)["fertility"]) < 1e-12
    md = (out / "results.md").read_text()
    assert "#### News (news)" in md and "#### Edge cases (edge)" in md and "Fairness Gini" in md
    for png in ("lorenz_curve.png", "per_dataset_fertility.png", "per_dataset_avg_token_rank.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png


def test_bad_datasets_configs_end_in_one_line(tokenizers: tuple, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    cfg, _, _ = tokenizers
    bad = tmp_path / "d.json"
    for content, needle in (({"datasets": {}}, "expected"), ({"languages": {"x": {"name": "X"}}}, "data_path"),
                            ({"languages": {"x": {"data_path": "missing"}}}, "does not exist")):
        bad.write_text(json.dumps(content))
        assert main(["tokenizer", "eval", "--config", str(cfg), "--datasets", str(bad), "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
    assert main(["tokenizer", "eval", "--config", str(cfg), "--out", str(tmp_path)]) == 2
    assert "either as --data or as --datasets" in capsys.readouterr().err
