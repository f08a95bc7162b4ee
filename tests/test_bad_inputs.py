"""Bad input across the commands: each case ends in one line naming the problem and exit code 2 (no
traceback, no exit 0 with a wrong result). One table: command, input, expected exit code, message fragment."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _data_helpers import make_corpus

from nanoforge.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

MC_DOC = {"question": "Die Hauptstadt von Frankreich ist", "choices": ["Oslo", "Paris"], "label": 1}


def _task(root: Path, name: str, docs: list[dict] | str, **fields) -> Path:
    data = root / f"{name}.jsonl"
    data.write_text(docs if isinstance(docs, str) else "".join(json.dumps(d) + "\n" for d in docs))
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
              "doc_to_target": "label", "doc_to_choice": "choices", **fields}
    path = root / f"{name}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Good artifacts (corpus, tokenizer, token shards, a 2-step checkpoint) and bad ones, made once."""
    from nanoforge.data.tokenize import tokenize_corpus
    from nanoforge.tokenizer.train import train_tokenizer

    root = tmp_path_factory.mktemp("bad_inputs")
    corpus = make_corpus(root / "corpus", n_docs=200, files=1)
    tok = train_tokenizer(corpus, vocab_size=300, backend="rustbpe", out=root / "tok")
    tokens = tokenize_corpus(corpus, tok, out=root / "tokens", val_docs=20, workers=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOFORGE_HOME", str(root / "home"))
        assert main(["train", "base", "--preset", "ci", "--tokens", str(tokens), "--tag", "c",
                     "--set", "train.max_steps=2", "--set", "train.eval_every=0"]) == 0
    ints = root / "ints"
    ints.mkdir()
    pq.write_table(pa.table({"text": pa.array([1, 2, 3], type=pa.int64())}), ints / "shard_00000.parquet")
    bad_jsonl = root / "bad.jsonl"
    bad_jsonl.write_text('{"text": "eins"}\n{"text": "zwei"}\n{"text": drei}\n')
    tok_config = root / "toks.json"
    tok_config.write_text(json.dumps({"ours": {"class": "nanoforge", "path": str(tok)}}))
    torn = root / "torn_tokens"
    shutil.copytree(tokens, torn)
    (torn / "train_docs.npy").write_bytes(np.random.default_rng(0).bytes(400))
    grid = root / "grid.toml"
    grid.write_text('[base]\npreset = "ci"\nset = "train.max_steps=5"\n[axes]\n"train.lr" = [1e-3, 2e-3]\n')
    tasks = root / "tasks"
    tasks.mkdir()
    return {
        "ROOT": str(root), "CORPUS": str(corpus), "TOK": str(tok), "TOKENS": str(tokens), "INTS": str(ints),
        "CKPT": str(root / "home" / "checkpoints" / "base" / "c"), "BADJSONL": str(bad_jsonl),
        "TOKCFG": str(tok_config), "TORN": str(torn), "GRID": str(grid),
        "MODELFILE": str(next((root / "home" / "checkpoints" / "base" / "c").glob("model_*.safetensors"))),
        "T_NOCHOICE": str(_task(tasks, "nochoice", [{**MC_DOC, "choices": []}])),
        "T_REGEX": str(_task(tasks, "badregex", [MC_DOC], output_type="generate_until", doc_to_target="{{question}}",
                             doc_to_choice=None, filter_list=[{"name": "x", "filter": [
                                 {"function": "regex", "regex_pattern": "(unclosed"}]}])),
        "T_UNTIL": str(_task(tasks, "until5", [MC_DOC], output_type="generate_until", doc_to_target="{{question}}",
                             doc_to_choice=None, generation_kwargs={"until": 5})),
        "T_LABEL": str(_task(tasks, "label7", [{**MC_DOC, "label": 7}])),
        "T_BLEU": str(_task(tasks, "bleu", [MC_DOC], metric_list=[{"metric": "bleu"}])),
        "T_EMPTY": str(_task(tasks, "empty", "")),
        "T_OK": str(_task(tasks, "ok", [MC_DOC] * 3)),
    }


# (argv with placeholders, exit code, fragment of the one error line)
CASES = [
    # a parquet `text` column that holds numbers
    ("tokenizer train --data INTS --vocab-size 300 --out ROOT/o/t1", 2, "column 'text' holds int64, not text"),
    ("tokenizer train --data INTS --vocab-size 300 --out ROOT/o/t2 --backend python", 2, "holds int64"),
    ("tokenizer train --data INTS --vocab-size 300 --out ROOT/o/t3 --backend neox", 2, "holds int64"),
    ("data import INTS --out ROOT/o/c1", 2, "holds int64"),
    ("data tokenize --corpus INTS --tokenizer TOK --out ROOT/o/k1", 2, "holds int64"),
    ("tokenizer eval --config TOKCFG --data INTS --out ROOT/o/e1", 2, "holds int64"),
    ("plan --corpus INTS --tokenizer TOK --params 1M", 2, "holds int64"),
    # a .jsonl with a bad line 3 names that line
    ("data import BADJSONL --out ROOT/o/c2", 2, "bad.jsonl:3: invalid JSON"),
    # numeric config keys out of range
    ("train base --preset ci --tokens TOKENS --tag x --set train.lr=nan", 2, "train.lr must be a finite number"),
    ("train base --preset ci --tokens TOKENS --tag x --set train.eps=-1", 2, "train.eps must be > 0"),
    ("train base --preset ci --tokens TOKENS --tag x --set train.beta1=1.5", 2, "train.beta1 must be in [0, 1)"),
    ("train base --preset ci --tokens TOKENS --tag x --set train.min_lr_frac=nan", 2, "train.min_lr_frac must be"),
    ("train base --preset ci --tokens TOKENS --tag x --set train.grad_clip=nan", 2, "train.grad_clip must be"),
    ("train base --preset ci --tokens TOKENS --tag x --set train.max_steps=inf", 2, "train.max_steps expects int"),
    # a corrupted document table
    ("data inspect TORN", 2, "document table"),
    ("train base --preset ci --tokens TORN --tag x --set data.layout=bos_aligned", 2, "document table"),
    # every document in validation
    ("data tokenize --corpus CORPUS --tokenizer TOK --out ROOT/o/k2 --val-docs 500 --workers 1", 2,
     "went to validation"),
    # eval, sample, import
    ("eval bpb CKPT --tokens TOKENS --device bogus", 2, "--device 'bogus' is not a device"),
    ("eval bpb CKPT --tokens TOKENS --seq-len 100000", 2, "longer than the model's context"),
    ("sample CKPT --prompt hallo --temperature nan", 2, "temperature must be >= 0"),
    ("import hf MODELFILE --tag imported", 2, "is a file: give the Hugging Face model folder"),
    # plan
    ("plan --params nan", 2, "--params must be a positive finite number"),
    ("plan --params inf", 2, "--params must be a positive finite number"),
    ("plan --params 1e400", 2, "--params must be a positive finite number"),
    ("plan --params 1M --ratio nan", 2, "--ratio must be a positive number"),
    ("plan --params 1M --ratio -1", 2, "--ratio must be a positive number"),
    ("plan --params 1M --ratio 0", 2, "--ratio must be a positive number"),
    ("plan --params 1M --chars-per-token -2", 2, "--chars-per-token must be a positive number"),
    ("plan --params 1M --chars-per-token 0", 2, "--chars-per-token must be a positive number"),
    # download
    ("data download foo/bar --retries 0", 2, "--retries must be at least 1"),
    ("data download foo/bar --pattern shard_{:q}.parquet", 2, "is not a file name pattern"),
    ("data download foo/bar --pattern ../../x{}.parquet", 2, "shard names must be relative paths"),
    # task files
    ("eval tasks CKPT --tasks T_NOCHOICE", 2, "must be a non-empty list of choices"),
    ("eval tasks CKPT --tasks T_REGEX", 2, "is not a valid regular expression"),
    ("eval tasks CKPT --tasks T_UNTIL", 2, "generation_kwargs.until must be a string or a list"),
    ("eval tasks CKPT --tasks T_LABEL", 2, "target 7 is not the index of one of the 2 choices"),
    ("eval tasks CKPT --tasks T_BLEU", 2, "metric 'bleu' is not supported"),
    ("eval tasks CKPT --tasks T_EMPTY", 2, "holds no documents"),
    ("eval tasks CKPT --tasks T_OK --limit -1", 2, "--limit must be >= 0"),
    # lm-eval: checked before lm-eval starts
    ("lm-eval --model nanoforge --model_args checkpoint=ROOT/nope --tasks demo_mc", 2, "does not exist"),
    ("lm-eval --model nanoforge --model_args checkpoint=CKPT,bogus=1 --tasks demo_mc", 2,
     "unknown argument(s) bogus"),
    # a grid whose `set` is a string
    ("ablate GRID", 2, "set must be a list"),
]


@pytest.mark.parametrize(("argv", "code", "fragment"), CASES, ids=[c[0][:60] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(argv: str, code: int, fragment: str, inputs, capsys) -> None:
    keys = sorted(inputs, key=len, reverse=True)  # TOKENS before TOK
    args = [next((a.replace(k, inputs[k], 1) for k in keys if a.startswith(k)), a) for a in argv.split()]
    args = [a.replace("checkpoint=ROOT", f"checkpoint={inputs['ROOT']}").replace("checkpoint=CKPT",
            f"checkpoint={inputs['CKPT']}") for a in args]
    assert main(args) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err


def test_offline_mode_is_named(monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["data", "download", "foo/bar", "--shards", "0"]) == 2
    assert "offline mode is on (HF_HUB_OFFLINE)" in capsys.readouterr().err


def test_a_home_that_is_a_file_is_named(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "home").write_text("x")
    monkeypatch.setenv("NANOFORGE_HOME", str(tmp_path / "home"))
    assert main(["checkpoints", "list"]) == 2
    assert "is a file, not a folder: point NANOFORGE_HOME at a folder" in capsys.readouterr().err


def test_eval_bpb_accepts_tokenizer(inputs, capsys) -> None:
    assert main(["eval", "bpb", inputs["CKPT"], "--tokens", inputs["TOKENS"], "--tokenizer", inputs["TOK"],
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["val_bpb"] > 0
