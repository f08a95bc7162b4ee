"""`nanoforge eval tasks|bpb`: task files, lm-eval's scoring rules, metrics against hand-computed values,
generative exact match with stop strings, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from nanoforge.cli import main
from nanoforge.errors import UserError

from _eval_helpers import make_checkpoint, make_tokenizer


@pytest.fixture(scope="module")
def ck(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("evaltasks")
    tok = make_tokenizer(root)
    return {"root": root, "tok": tok, "ckpt": make_checkpoint(root, tok)}


def write_task(folder: Path, name: str, docs: list[dict], body: str, data: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    path = folder / f"{name}.yaml"
    path.write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                    f"    test: {data or name + '.jsonl'}\ntest_split: test\n" + body, encoding="utf-8")
    return path


MC_BODY = ("output_type: multiple_choice\ndoc_to_text: \"{{q}}\"\ndoc_to_choice: choices\n"
           "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")


# ---- lm-eval's tokenization rule -----------------------------------------------------------------------
def test_encode_pair_moves_trailing_space_and_splits_the_whole_encoding(ck) -> None:
    from nanoforge.eval.scoring import encode_pair
    from nanoforge.tokenizer import Tokenizer

    tok = Tokenizer.load(ck["tok"])
    ctx, cont = encode_pair(tok, "der Hund ist ", "rot")
    whole = tok.encode("der Hund ist rot", bos=True)
    assert ctx == tok.encode("der Hund ist", bos=True)
    assert ctx + cont == whole and ctx[0] == tok.bos_id


def test_scores_match_a_plain_forward_pass(ck) -> None:
    """The shared-prefix KV-cache batch gives the same log-likelihoods as one full forward per choice."""
    from nanoforge.eval.scoring import encode_pair, score_group
    from nanoforge.infer.engine import load_checkpoint

    model, tok, _ = load_checkpoint(ck["ckpt"])
    pairs = [encode_pair(tok, "die Katze sieht", " " + c) for c in ["den Mond", "blau", "ein Haus und zwei Sterne"]]
    got = score_group(model, pairs[0][0], [c for _, c in pairs])
    for (ctx, cont), (ll, _) in zip(pairs, got):
        with torch.no_grad():
            logits = model(torch.tensor([ctx + cont[:-1]]))[0, len(ctx) - 1:]
        ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).sum().item()
        assert ll == pytest.approx(ref, abs=1e-4)


# ---- metrics against hand-computed values ---------------------------------------------------------------
def test_acc_norm_divides_by_continuation_characters() -> None:
    from nanoforge.eval.metrics import multiple_choice

    # lls -3, -4, -10: acc picks 0 ("a"); per char -3/1, -4/8, -10/20 = -3, -0.5, -0.5 -> first max is 1
    r = multiple_choice([-3.0, -4.0, -10.0], ["a", "bbbbbbbb", "c" * 20], gold=1)
    assert r == {"acc": 0.0, "acc_norm": 1.0}


def test_mc2_is_normalised_true_probability_mass() -> None:
    from nanoforge.eval.metrics import mc2

    lls = [math.log(0.2), math.log(0.1), math.log(0.3), math.log(0.4)]
    assert mc2(lls, [1, 1, 0, 0]) == pytest.approx(0.3 / 1.0)
    assert mc2([math.log(0.5), math.log(0.25)], [1, 0]) == pytest.approx(2 / 3)


def test_mean_stderr_is_sample_std_over_sqrt_n() -> None:
    from lm_eval.api.metrics import mean_stderr as lm_mean_stderr

    from nanoforge.eval.metrics import mean_stderr

    vals = [1.0, 0.0, 1.0, 1.0, 0.0]
    assert mean_stderr(vals) == pytest.approx(math.sqrt(0.3 / 5))
    assert mean_stderr(vals) == pytest.approx(lm_mean_stderr(vals))


def test_run_tasks_with_a_fake_scorer_gives_hand_computed_acc_acc_norm_mc2(ck, tmp_path, monkeypatch) -> None:
    import nanoforge.eval.tasks as T
    from nanoforge.infer.engine import load_checkpoint

    docs = [{"q": "eins", "choices": ["a", "bbbb"], "label": 0, "labels": [1, 0]},
            {"q": "zwei", "choices": ["cc", "d"], "label": 0, "labels": [1, 0]}]
    # doc 1: acc picks "a" (right), per char -1 vs -0.5 picks "bbbb" (wrong); doc 2: the reverse
    fake = {"eins": [-1.0, -2.0], "zwei": [-3.0, -2.0]}
    model, tok, _ = load_checkpoint(ck["ckpt"])

    def scorer(model_, pairs, *a, **k):
        return fake["eins" if "eins" in tok.decode(pairs[0][0]) else "zwei"]

    monkeypatch.setattr(T, "_score_pairs", scorer)
    body = MC_BODY.replace("  - metric: acc_norm\n", "  - metric: acc_norm\n  - metric: mc2\nmc2_labels: labels\n")
    path = write_task(tmp_path, "fake_mc", docs, body)
    r = T.run_tasks(model, [path], tokenizer=tok)["results"]["fake_mc"]
    assert (r["acc,none"], r["acc_norm,none"]) == (0.5, 0.5)
    p1 = math.exp(-1) / (math.exp(-1) + math.exp(-2))   # true mass of doc 1
    p2 = math.exp(-3) / (math.exp(-3) + math.exp(-2))   # doc 2
    assert r["mc2,none"] == pytest.approx((p1 + p2) / 2)
    assert r["acc_norm_stderr,none"] == pytest.approx(0.5)  # sample std of [1, 0] is 1/sqrt(2), / sqrt(2)


# ---- generative -----------------------------------------------------------------------------------------
def test_generative_exact_match_cuts_at_stop_strings_then_extracts(ck, tmp_path, monkeypatch) -> None:
    import nanoforge.infer.engine as engine
    from nanoforge.eval.tasks import run_tasks

    docs = [{"question": "1+1", "answer": "#### 2"}, {"question": "2+2", "answer": "#### 4"},
            {"question": "3+3", "answer": "#### 6"}]
    outputs = {"1+1": " zwei #### 2\n\nFrage: 9 #### 9", "2+2": " #### 5 und dann\n\n#### 4",
               "3+3": " das ist 6 Frage: #### 6"}

    def fake_generate(model, tokenizer, prompt, **kw):
        text = tokenizer.decode(prompt) if not isinstance(prompt, str) else prompt
        return next(v for k, v in outputs.items() if k in text)

    monkeypatch.setattr(engine, "generate", fake_generate)
    body = ("output_type: generate_until\ndoc_to_text: \"Frage: {{question}}\\nAntwort:\"\n"
            "doc_to_target: \"{{answer.split('####')[-1].strip()}}\"\n"
            "generation_kwargs:\n  until: [\"\\n\\n\", \"Frage:\"]\n  max_gen_toks: 8\n"
            "metric_list:\n  - metric: exact_match\n"
            "filter_list:\n  - name: strict-match\n    filter:\n      - function: regex\n"
            "        regex_pattern: \"#### (\\\\-?[0-9\\\\.\\\\,]+)\"\n      - function: take_first\n"
            "  - name: flexible\n    filter:\n      - function: regex\n        group_select: -1\n"
            "        regex_pattern: \"(-?[0-9]+)\"\n")
    path = write_task(tmp_path, "fake_gen", docs, body)
    r = run_tasks(ck["ckpt"], [path])["results"]["fake_gen"]
    # strict: doc1 "2" ok (the 9 after the stop is cut), doc2 "5" wrong, doc3 nothing before "Frage:" -> invalid
    assert r["exact_match,strict-match"] == pytest.approx(1 / 3)
    # flexible (last number): "2" ok, "5" wrong, "6" ok
    assert r["exact_match,flexible"] == pytest.approx(2 / 3)


# ---- bundled and demo tasks -----------------------------------------------------------------------------
def test_list_shows_bundled_and_demo_tasks(capsys) -> None:
    assert main(["eval", "tasks", "--list", "--json"]) == 0
    names = {t["task"] for t in json.loads(capsys.readouterr().out)}
    assert {"demo_mc", "demo_gen", "arc_de", "hellaswag_de", "m_mmlu_de", "truthfulqa_de_mc1",
            "truthfulqa_de_mc2"} <= names


def test_demo_tasks_run_from_the_cli_and_write_results(ck, tmp_path, capsys) -> None:
    out = tmp_path / "r.json"
    assert main(["eval", "tasks", str(ck["ckpt"]), "--tasks", "demo_mc", "demo_gen", "--limit", "6",
                 "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads(out.read_text())
    assert printed["results"] == saved["results"]
    mc = saved["results"]["demo_mc"]
    assert 0.0 <= mc["acc,none"] <= 1.0 and mc["acc_norm_stderr,none"] >= 0.0
    assert "exact_match,strict-match" in saved["results"]["demo_gen"]
    assert saved["n-samples"]["demo_mc"]["effective"] == 6


def test_bundled_task_without_data_says_where_to_put_it(ck, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NANOFORGE_HOME", str(tmp_path / "home"))
    from nanoforge.eval.tasks import run_tasks

    with pytest.raises(UserError, match=r"task_data/m_arc/de_test\.jsonl"):
        run_tasks(ck["ckpt"], ["arc_de"], limit=1)


def test_bundled_german_prompts_render_like_lm_eval(tmp_path) -> None:
    """Our arc_de template renders the okapi prompt lm-eval's own m_arc task uses."""
    from nanoforge.eval.taskspec import load_task

    spec = load_task("arc_de")
    doc = {"instruction": "Was  ist [title] rot?", "option_a": "A1", "option_b": "B1 ", "option_c": "C1",
           "option_d": "D1", "option_e": "", "answer": "B", "id": "x"}
    assert spec.doc_to_text(doc) == "Question: Was ist. rot?\nAnswer:"
    assert spec.doc_to_choice(doc) == ["A1", "B1", "C1", "D1"]
    assert spec.gold_index(doc, spec.doc_to_choice(doc)) == 1


# ---- bad input: one line, exit 2 -------------------------------------------------------------------------
def test_missing_field_names_field_and_line(ck, tmp_path, capsys) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("# comment\ntask: broken\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                    "    test: x.jsonl\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: q\n"
                    "doc_to_choice: choices\n", encoding="utf-8")
    assert main(["eval", "tasks", str(ck["ckpt"]), "--tasks", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "doc_to_target" in err and "line" in err and "broken.yaml" in err


def test_missing_data_file_is_one_line(ck, tmp_path, capsys) -> None:
    path = write_task(tmp_path, "nodata", [], MC_BODY, data=str(tmp_path / "absent.jsonl"))
    assert main(["eval", "tasks", str(ck["ckpt"]), "--tasks", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "absent.jsonl" in err and "does not exist" in err


def test_unknown_task_name_lists_bundled(ck, capsys) -> None:
    assert main(["eval", "tasks", str(ck["ckpt"]), "--tasks", "no_such_task"]) == 2
    err = capsys.readouterr().err
    assert "no_such_task" in err and "demo_mc" in err


def test_bpb_refuses_token_shards_of_another_tokenizer(ck, tmp_path, capsys) -> None:
    shards = tmp_path / "tokens"
    shards.mkdir()
    (shards / "meta.json").write_text(json.dumps({"tokenizer_fingerprint": "not-the-same", "vocab_size": 512}))
    assert main(["eval", "bpb", str(ck["ckpt"]), "--tokens", str(shards)]) == 2
    err = capsys.readouterr().err
    assert "not-the-same" in err and len(err.strip().splitlines()) == 1
