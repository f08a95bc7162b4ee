"""Evaluation: metrics against hand-computed values, task files (errors name field and line), generative
exact match with stop strings and regex extraction, the three-way agreement of our evaluator, lm-eval on
the native checkpoint and lm-eval --model hf on the export, comparison tables, eval bpb, bad input."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
import torch
from _eval_helpers import make_checkpoint, make_tokenizer, write_text

from nanoforge.cli import main
from nanoforge.errors import UserError
from nanoforge.eval import metrics as M
from nanoforge.eval.compare import compare_results
from nanoforge.eval.taskspec import TaskError, list_tasks, lm_eval_yaml, load_task


# ---- metrics ---------------------------------------------------------------------------------------
def test_acc_and_acc_norm_hand_computed() -> None:
    # lls/len: -2.0, -1.0, -3.0 -> acc picks choice 2 (ll -3), acc_norm picks choice 1
    r = M.multiple_choice([-4.0, -6.0, -3.0], ["ab", "abcdef", "a"], 1)
    assert r == {"acc": 0.0, "acc_norm": 1.0}


def test_mc2_and_stderr_hand_computed() -> None:
    assert M.mc2([math.log(0.2), math.log(0.3), math.log(0.5)], [1, 1, 0]) == pytest.approx(0.5)
    assert M.mc2([math.log(2.0), math.log(6.0)], [0, 1]) == pytest.approx(0.75)  # unnormalised input
    assert M.mean_stderr([1, 0, 1, 1]) == pytest.approx(0.25)  # sd (n-1) = 0.5, / sqrt(4)


def test_regex_extraction_and_exact_match() -> None:
    assert M.regex_extract("so ist es 12. #### 12", r"#### (\-?[0-9\.\,]+)") == "12"
    assert M.regex_extract("keine Zahl", r"#### (\-?[0-9\.\,]+)") == "[invalid]"
    assert M.regex_extract("3 und 45", r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1) == "45"
    assert M.exact_match("Paris", "paris", ignore_case=True) == 1.0
    assert M.exact_match("Paris!", "Paris") == 0.0


# ---- task files --------------------------------------------------------------------------------------
def _task(tmp: Path, body: str, data: list[dict] | None = None) -> Path:
    (tmp / "d.jsonl").write_text("".join(json.dumps(d) + "\n" for d in (data or [{"q": "a", "c": ["x", "y"],
                                                                                "l": 0}])))
    path = tmp / "t.yaml"
    path.write_text(body)
    return path


def test_missing_field_names_field_and_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _task(tmp_path, "task: t\ndataset_path: json\ndataset_kwargs:\n  data_files: d.jsonl\n"
                           "output_type: multiple_choice\ndoc_to_target: l\ndoc_to_choice: c\n")
    with pytest.raises(TaskError, match=r"t\.yaml: line \d+: task 't' is missing the field doc_to_text"):
        load_task(path)
    assert main(["eval", "tasks", "ckpt", "--tasks", str(path)]) == 2
    err = capsys.readouterr().err
    assert "doc_to_text" in err and err.count("\n") == 1


def test_python_hook_and_bad_output_type_are_refused_with_line(tmp_path: Path) -> None:
    path = _task(tmp_path, "task: t\ndataset_path: json\ndoc_to_text: q\ndoc_to_target: l\n"
                           "process_docs: !function utils.process_docs\n")
    with pytest.raises(TaskError, match=r"line 5: field process_docs uses a Python hook"):
        load_task(path)
    path = _task(tmp_path, "task: t\ndataset_path: json\ndoc_to_text: q\ndoc_to_target: l\noutput_type: rank\n")
    with pytest.raises(TaskError, match=r"line 5: output_type 'rank'"):
        load_task(path)


def test_templates_follow_lm_eval_rules(tmp_path: Path) -> None:
    doc = {"question": "Frage?", "a": "eins", "b": "zwei", "answer": "B"}
    path = _task(tmp_path, "task: t\ndataset_path: json\ndataset_kwargs:\n  data_files: {test: d.jsonl}\n"
                           "test_split: test\noutput_type: multiple_choice\n"
                           "doc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_choice: \"{{[a, b]}}\"\n"
                           "doc_to_target: \"{{['A', 'B'].index(answer)}}\"\n", [doc])
    spec = load_task(path)
    d = spec.docs()[0]
    assert spec.doc_to_text(d) == "Q: Frage?\nA:"
    assert spec.doc_to_choice(d) == ["eins", "zwei"] and spec.doc_to_target(d) == 1


def test_bundled_tasks_list_and_load(capsys: pytest.CaptureFixture) -> None:
    names = {t["task"] for t in list_tasks()}
    assert {"demo_mc", "demo_gen", "arc_de", "hellaswag_de", "m_mmlu_de", "truthfulqa_de_mc1",
            "truthfulqa_de_mc2"} <= names
    for n in names:
        load_task(n)
    assert len(load_task("demo_mc").docs()) == 39
    assert main(["eval", "tasks", "--list"]) == 0
    assert "demo_gen" in capsys.readouterr().out


def test_demo_data_is_what_the_generator_writes(tmp_path: Path) -> None:
    from nanoforge.eval.demo import write_demo_data
    from nanoforge.eval.taskspec import BUNDLED

    for f in write_demo_data(tmp_path):
        assert f.read_bytes() == (BUNDLED / f.name).read_bytes()


def test_okapi_templates_render_like_lm_eval_preprocess() -> None:
    from lm_eval.tasks.okapi.arc_multilingual.utils import preprocess

    arc = load_task("arc_de")
    doc = {"instruction": " Was ist [x] blau? ", "option_a": "Himmel", "option_b": "Gras [title] grün", "option_c": "",
           "option_d": None, "option_e": None, "answer": "B"}
    assert arc.doc_to_text(doc) == "Question: " + preprocess(doc["instruction"]) + "\nAnswer:"
    assert arc.doc_to_choice(doc) == ["Himmel", preprocess("Gras [title] grün")] and arc.doc_to_target(doc) == 1
    hs = load_task("hellaswag_de")
    doc = {"activity_label": "Kochen", "ctx_a": "Ein Mann", "ctx_b": "schneidet [step] Brot",
           "endings": [" a [step] b", "c [title] d"], "label": "1"}
    assert hs.doc_to_text(doc) == preprocess("Kochen: Ein Mann " + "schneidet [step] Brot".capitalize())
    assert hs.doc_to_choice(doc) == [preprocess(" a [step] b"), preprocess("c [title] d")]
    assert hs.doc_to_target(doc) == 1


# ---- a model for the end-to-end tests -------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from nanoforge.export.hf import export_hf

    root = tmp_path_factory.mktemp("eval")
    tok = make_tokenizer(root)
    ckpt = make_checkpoint(root, tok)
    return {"root": root, "tok": tok, "ckpt": ckpt, "export": export_hf(ckpt, root / "hf")}


def test_generative_exact_match_with_stop_strings(setup: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import nanoforge.infer.engine as engine
    from nanoforge.eval.tasks import run_tasks

    answers = []

    def fake_generate(model, tokenizer, ids, **kw):
        text = tokenizer.decode(ids)
        a, b = (int(s) for s in text.split("Was ist ")[1].split("?")[0].split(" plus "))
        answers.append(a + b)
        wrong = len(answers) % 2 == 0  # every second answer is wrong after the stop string only
        return f" {a} plus {b} ist {a + b}. #### {a + b}\n\nFrage: #### 99" if not wrong else \
            f" ich weiß nicht\n\n#### {a + b}"

    monkeypatch.setattr(engine, "generate", fake_generate)
    r = run_tasks(setup["ckpt"], ["demo_gen"], limit=10)["results"]["demo_gen"]
    assert r["exact_match,strict-match"] == pytest.approx(0.5)  # the '#### n' after "\n\n" was cut off
    assert r["exact_match_stderr,strict-match"] == pytest.approx(M.mean_stderr([1, 0] * 5))
    assert r["exact_match,flexible-extract"] == pytest.approx(0.5)


LIMIT = 20  # documents of demo_mc (80 log-likelihood requests): enough for distinct acc/acc_norm values


@pytest.fixture(scope="module")
def three_way(setup: dict) -> dict:
    """demo_mc scored by our evaluator, lm-eval on the native checkpoint (CLI) and lm-eval --model hf."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from nanoforge.eval.tasks import run_tasks

    root = setup["root"]
    include = root / "include"
    lm_eval_yaml(load_task("demo_mc"), include)
    ours = run_tasks(setup["ckpt"], [include / "demo_mc.yaml"], out=root / "ours.json", limit=LIMIT)
    rc = main(["lm-eval", "--model", "nanoforge", "--model_args", f"checkpoint={setup['ckpt']}",
               "--tasks", "demo_mc", "--include_path", str(include), "--limit", str(LIMIT), "--output_path", str(root / "native")])
    hf = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={setup['export']},dtype=float32,device=cpu",
                                 tasks=["demo_mc"], task_manager=TaskManager(include_path=str(include), include_defaults=False),
                                 batch_size=8, limit=LIMIT)
    (root / "hf.json").write_text(json.dumps({"results": hf["results"], "config": {"model_args": "hf-export"}},
                                             default=str))
    native_files = sorted((root / "native").rglob("results*.json"))
    return {"ours": ours["results"]["demo_mc"], "rc": rc, "hf": hf["results"]["demo_mc"],
            "native": json.loads(native_files[-1].read_text())["results"]["demo_mc"] if native_files else None,
            "paths": [root / "ours.json", root / "native", root / "hf.json"]}


def test_three_way_agreement_on_local_multiple_choice(three_way: dict) -> None:
    assert three_way["rc"] == 0 and three_way["native"] is not None
    for key in ("acc,none", "acc_norm,none", "acc_stderr,none", "acc_norm_stderr,none"):
        assert abs(three_way["ours"][key] - three_way["hf"][key]) <= 1e-6, key
        assert abs(three_way["native"][key] - three_way["hf"][key]) <= 1e-6, key


def test_bundled_truthfulqa_mc2_file_runs_in_lm_eval_and_in_nanoforge_alike(setup: dict) -> None:
    """The same truthfulqa_de_mc2.yaml: lm-eval calls the shipped process_results hook, nanoforge computes mc2
    itself; both give the same per-task mc2."""
    from nanoforge import home
    from nanoforge.eval.lm_adapter import evaluate_with_lm_eval
    from nanoforge.eval.tasks import run_tasks

    docs = [{"question": f"Frage {i}?", "mc2_targets_choices": ["Ja.", "Nein.", "Vielleicht.", "Nie."][: 2 + i % 3],
             "mc2_targets_labels": [1, 0, 1, 0][: 2 + i % 3]} for i in range(6)]
    data = home.home() / "task_data" / "m_truthfulqa" / "de_val.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    include = lm_eval_yaml(load_task("truthfulqa_de_mc2"), setup["root"] / "tqa").parent
    assert (include / "truthfulqa_utils.py").is_file()
    ours = run_tasks(setup["ckpt"], ["truthfulqa_de_mc2"])["results"]["truthfulqa_de_mc2"]
    theirs = evaluate_with_lm_eval(setup["ckpt"], ["truthfulqa_de_mc2"], include_path=include)
    theirs = theirs["results"]["truthfulqa_de_mc2"]
    assert 0.0 < ours["mc2,none"] < 1.0
    assert abs(ours["mc2,none"] - theirs["mc2,none"]) <= 1e-6
    assert abs(ours["mc2_stderr,none"] - theirs["mc2_stderr,none"]) <= 1e-6


def test_lm_eval_python_api_with_model_object(setup: dict, three_way: dict) -> None:
    from nanoforge.eval.lm_adapter import NanoforgeLM
    from nanoforge.infer.engine import load_checkpoint
    from nanoforge.tokenizer import Tokenizer

    model, tok, _ = load_checkpoint(setup["ckpt"])
    lm = NanoforgeLM(model=model, tokenizer=tok)
    ctx = "Die Hauptstadt von Frankreich ist"
    from lm_eval.api.instance import Instance

    reqs = [Instance("loglikelihood", {}, (ctx, " Paris"), 0), Instance("loglikelihood_rolling", {}, ("rot blau",), 0)]
    ll = lm.loglikelihood(reqs[:1])[0][0]
    from nanoforge.eval.scoring import _score_full, encode_pair

    c, cont = encode_pair(Tokenizer.load(setup["tok"]), ctx, " Paris")
    with torch.no_grad():
        assert ll == pytest.approx(_score_full(model, c, cont)[0], abs=1e-4)  # one plain forward
    assert lm.loglikelihood_rolling(reqs[1:])[0] < 0


def test_compare_reads_ours_and_lm_eval(three_way: dict) -> None:
    md = compare_results(three_way["paths"], fmt="md", stderr=True)
    assert "| Model |" in md and "Avg" in md and "demo_mc acc_norm" in md and "±" in md
    rows = list(csv.reader(io.StringIO(compare_results(three_way["paths"], fmt="csv"))))
    assert len(rows) == 4 and rows[1][1] == rows[2][1] == rows[3][1]  # the same acc from all three
    assert "\\begin{tabular}" in compare_results(three_way["paths"], fmt="tex")


def test_compare_bold_best_and_flags_within_stderr() -> None:
    a = {"name": "a", "results": {"t": {"acc,none": 0.50, "acc_stderr,none": 0.05}}}
    b = {"name": "b", "results": {"t": {"acc,none": 0.47, "acc_stderr,none": 0.05}}}
    c = {"name": "c", "results": {"t": {"acc,none": 0.30, "acc_stderr,none": 0.05}}}
    md = compare_results([a, b, c])
    lines = md.splitlines()
    assert "**50.00**" in lines[2] and "47.00†" in lines[3] and "30.00 |" in lines[4] and "†" not in lines[4]


def test_compare_bad_input_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "x.json").write_text("{}")
    assert main(["eval", "compare", str(tmp_path / "x.json")]) == 2
    assert "not a results JSON" in capsys.readouterr().err


# ---- bits per byte ------------------------------------------------------------------------------------
def test_eval_bpb_and_tokenizer_mismatch(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from nanoforge.data.tokenize import tokenize_corpus
    from nanoforge.tokenizer import Tokenizer

    tokens = tokenize_corpus(write_text(tmp_path / "c", n_docs=60, seed=1), Tokenizer.load(setup["tok"]),
                             out=tmp_path / "tokens", val_docs=20, workers=1, split_blank_lines=True)
    assert main(["eval", "bpb", str(setup["ckpt"]), "--tokens", str(tokens), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["val_bpb"] > 0 and r["bytes"] > 0
    meta = json.loads((tokens / "meta.json").read_text())
    meta["tokenizer_fingerprint"] = "0" * 16
    (tokens / "meta.json").write_text(json.dumps(meta))
    assert main(["eval", "bpb", str(setup["ckpt"]), "--tokens", str(tokens)]) == 2
    err = capsys.readouterr().err
    assert "were made with tokenizer 0000000000000000" in err and err.count("\n") == 1


def test_eval_bpb_under_torchrun_matches_one_process(setup: dict, tmp_path: Path) -> None:
    """Two gloo ranks score disjoint shares of the validation split; the all-reduced bpb is the 1-process one."""
    import os
    import subprocess
    import sys

    from nanoforge.data.tokenize import tokenize_corpus
    from nanoforge.eval.tasks import evaluate_bpb_checkpoint
    from nanoforge.tokenizer import Tokenizer

    tokens = tokenize_corpus(write_text(tmp_path / "c", n_docs=60, seed=2), Tokenizer.load(setup["tok"]),
                             out=tmp_path / "tokens", val_docs=20, workers=1, split_blank_lines=True)
    one = evaluate_bpb_checkpoint(setup["ckpt"], tokens, batch_size=2, seq_len=32)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "nanoforge", "eval", "bpb", str(setup["ckpt"]), "--tokens", str(tokens),
                        "--batch-size", "2", "--seq-len", "32", "--json"],
                       capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    two = json.loads(r.stdout)
    assert two["world_size"] == 2
    assert two["tokens"] == one["tokens"] and two["bytes"] == one["bytes"]
    assert abs(two["val_bpb"] - one["val_bpb"]) < 1e-6


def test_checkpoint_with_a_different_tokenizer_is_refused(setup: dict, tmp_path: Path) -> None:
    from nanoforge.eval.tasks import run_tasks
    from nanoforge.tokenizer.train import train_tokenizer

    other = train_tokenizer(write_text(tmp_path / "o", seed=7), vocab_size=300, backend="rustbpe", out=tmp_path / "t")
    with pytest.raises(UserError, match="is not the one checkpoint"):
        run_tasks(setup["ckpt"], ["demo_mc"], tokenizer=str(other), limit=1)
