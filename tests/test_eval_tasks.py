"""`nanoforge eval tasks|bpb`: task files, lm-eval's scoring rules, metrics against hand-computed values,
generative exact match with stop strings, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _eval_helpers import make_checkpoint, make_tokenizer

from nanoforge.cli import main
from nanoforge.errors import UserError


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
    """The shared-prefix packed row gives the same log-likelihoods as one full forward per choice."""
    from nanoforge.eval.packed import score_packed
    from nanoforge.eval.scoring import encode_pair
    from nanoforge.infer.engine import load_checkpoint

    model, tok, _ = load_checkpoint(ck["ckpt"])
    pairs = [encode_pair(tok, "die Katze sieht", " " + c) for c in ["den Mond", "blau", "ein Haus und zwei Sterne"]]
    got = score_packed(model, [(pairs[0][0], [c for _, c in pairs])])[0]
    for (ctx, cont), (ll, _) in zip(pairs, got):
        with torch.no_grad():
            logits = model(torch.tensor([ctx + cont[:-1]]))[0, len(ctx) - 1:]
        ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).sum().item()
        assert ll == pytest.approx(ref, abs=1e-4)


def test_packed_batches_equal_one_forward_per_pair(ck) -> None:
    """Many questions packed into one forward (context once, choices masked apart) give lm-eval's per-pair
    log-likelihoods and greedy flags; a question longer than the window falls back to left truncation."""
    from nanoforge.eval.packed import score_packed
    from nanoforge.eval.scoring import _score_full, encode_pair
    from nanoforge.infer.engine import load_checkpoint

    model, tok, _ = load_checkpoint(ck["ckpt"])
    qs = [("die Katze sieht", [" den Mond", " blau", " ein Haus und zwei Sterne"]), ("rot ", ["blau", "Erde"]),
          ("der Hund läuft schnell und die Sonne ist", [" heiß", " kalt"]),
          (" ".join(["Wasser"] * 300), [" Feuer", " Erde Himmel"])]  # longer than max_seq_len 256
    requests = []
    for ctx, conts in qs:
        pairs = [encode_pair(tok, ctx, c) for c in conts]
        requests.append((pairs[0][0], [c for _, c in pairs]))
    got = score_packed(model, requests, max_batch_tokens=64)  # forces several batches
    for (ctx, conts), scores in zip(requests, got):
        for cont, (ll, greedy) in zip(conts, scores):
            with torch.no_grad():
                ref_ll, ref_greedy = _score_full(model, list(ctx), list(cont))
            assert ll == pytest.approx(ref_ll, abs=1e-4) and greedy == ref_greedy


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

    docs = [{"q": "eins", "choices": ["a", "bbbb"], "label": 0, "mc2_targets_labels": [1, 0]},
            {"q": "zwei", "choices": ["cc", "d"], "label": 0, "mc2_targets_labels": [1, 0]}]
    # doc 1: acc picks "a" (right), per char -1 vs -0.5 picks "bbbb" (wrong); doc 2: the reverse
    fake = {"eins": [-1.0, -2.0], "zwei": [-3.0, -2.0]}
    model, tok, _ = load_checkpoint(ck["ckpt"])

    def scorer(model_, docs_pairs, **k):
        return [fake["eins" if "eins" in tok.decode(pairs[0][0]) else "zwei"] for pairs in docs_pairs]

    monkeypatch.setattr(T, "_score_docs", scorer)
    body = MC_BODY.replace("  - metric: acc_norm\n", "  - metric: acc_norm\n  - metric: mc2\n")
    path = write_task(tmp_path, "fake_mc", docs, body)
    r = T.run_tasks(model, [path], tokenizer=tok)["results"]["fake_mc"]
    assert (r["acc,none"], r["acc_norm,none"]) == (0.5, 0.5)
    p1 = math.exp(-1) / (math.exp(-1) + math.exp(-2))   # true mass of doc 1
    p2 = math.exp(-3) / (math.exp(-3) + math.exp(-2))   # doc 2
    assert r["mc2,none"] == pytest.approx((p1 + p2) / 2)
    assert r["acc_norm_stderr,none"] == pytest.approx(0.5)  # sample std of [1, 0] is 1/sqrt(2), / sqrt(2)


def test_encode_pair_equals_lm_eval_hf_on_the_exported_tokenizer(ck) -> None:
    """lm-eval's own `_encode_pair` with the HF tokenizer export (BOS from its post-processor, as
    `--model hf` encodes) gives exactly our context/continuation ids."""
    from lm_eval.api.model import TemplateLM
    from transformers import AutoTokenizer

    from nanoforge.eval.scoring import encode_pair
    from nanoforge.tokenizer import Tokenizer

    ours = Tokenizer.load(ck["tok"])
    hf = AutoTokenizer.from_pretrained(str(Path(ck["tok"]) / "hf"))

    class HFLike:  # what lm-eval's HFLM.tok_encode does for a causal model with add_bos_token unset
        backend = "causal"

        def tok_encode(self, string: str, **kw) -> list[int]:
            return hf.encode(string)

    for ctx, cont in [("der Hund ist ", "rot"), ("Frage: grün\n\n", " Antwort"), ("Katze", " läuft schnell."),
                      ("zwei  drei\t", "vier fünf")]:
        assert encode_pair(ours, ctx, cont) == TemplateLM._encode_pair(HFLike(), ctx, cont), (ctx, cont)


# ---- lm-eval Python API and comparison tables -----------------------------------------------------------
def test_evaluate_with_lm_eval_takes_a_model_object(ck, tmp_path) -> None:
    from nanoforge.eval.lm_adapter import evaluate_with_lm_eval
    from nanoforge.eval.tasks import run_tasks
    from nanoforge.eval.taskspec import lm_eval_yaml, load_task
    from nanoforge.infer.engine import load_checkpoint

    model, tok, _ = load_checkpoint(ck["ckpt"])
    include = tmp_path / "include"
    lm_eval_yaml(load_task("demo_mc"), include)
    theirs = evaluate_with_lm_eval(model, ["demo_mc"], tokenizer=tok, include_path=include, limit=5)
    ours = run_tasks(model, ["demo_mc"], tokenizer=tok, limit=5)
    for key in ("acc,none", "acc_norm,none"):
        assert theirs["results"]["demo_mc"][key] == pytest.approx(ours["results"]["demo_mc"][key], abs=1e-6)


def test_compare_skips_lm_eval_bookkeeping_and_ranks_lower_is_better() -> None:
    from nanoforge.eval.compare import compare_results

    a = {"name": "a", "results": {"t": {"alias": "t", "acc,none": 0.6, "acc_stderr,none": 0.01,
                                        "sample_len": 100, "bits_per_byte,none": 1.2}}}
    b = {"name": "b", "results": {"t": {"alias": "t", "acc,none": 0.4, "acc_stderr,none": 0.01,
                                        "sample_len": 100, "bits_per_byte,none": 1.0}}}
    md = compare_results([a, b])
    header, _, row_a, row_b = md.splitlines()[:4]
    assert "sample_len" not in header and "t acc" in header and "t bits_per_byte" in header
    assert "**60.00**" in row_a and "**1.00**" in row_b and "| 1.20 |" in row_a  # lower bpb is better, unscaled


# ---- bundled and demo tasks -----------------------------------------------------------------------------
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


# ---- bad input: one line, exit 2 -------------------------------------------------------------------------
def test_missing_data_file_is_one_line(ck, tmp_path, capsys) -> None:
    path = write_task(tmp_path, "nodata", [], MC_BODY, data=str(tmp_path / "absent.jsonl"))
    assert main(["eval", "tasks", str(ck["ckpt"]), "--tasks", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "absent.jsonl" in err and "does not exist" in err


def test_unknown_task_name_lists_bundled(ck, capsys) -> None:
    assert main(["eval", "tasks", str(ck["ckpt"]), "--tasks", "no_such_task"]) == 2
    err = capsys.readouterr().err
    assert "no_such_task" in err and "demo_mc" in err




def test_truthfulqa_and_mmlu_prompts_render_like_lm_eval_okapi() -> None:
    from lm_eval.tasks.okapi.truthfulqa_multilingual.utils import QA_PROMPT, preprocess

    from nanoforge.eval.taskspec import load_task

    doc = {"question": " Wer  war [x] Kanzler? ", "mc1_targets_choices": ["a", "b"],
           "mc2_targets_choices": ["a", "b", "c"], "mc2_targets_labels": [1, 1, 0]}
    for name in ("truthfulqa_de_mc1", "truthfulqa_de_mc2"):
        spec = load_task(name)
        assert spec.doc_to_text(doc) == QA_PROMPT + "\n\nQ: " + preprocess(doc["question"]) + "\nA:"
    assert load_task("truthfulqa_de_mc2").doc_to_choice(doc) == ["a", "b", "c"]
    mmlu = load_task("m_mmlu_de")
    doc = {"instruction": " Was ist 2+2? ", "option_a": "3", "option_b": "4", "option_c": "5", "option_d": "6",
           "answer": "B"}
    assert mmlu.doc_to_text(doc) == "Was ist 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    assert mmlu.gold_index(doc, mmlu.doc_to_choice(doc)) == 1
