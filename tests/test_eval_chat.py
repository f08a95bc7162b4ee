"""`eval chat` on a tiny fine-tuned model against a hand computation: categorical multiple choice from the
letters' logits at the answer position, generation with the calculator tool by a plain greedy loop (no KV
cache, no engine), ChatCORE, lm-eval's layout read by `eval compare`, and bad input."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from _sft_helpers import conversation, make_base

from nanoforge.cli import main
from nanoforge.eval.chat import eval_chat
from nanoforge.train.sft import train_sft

pytestmark = pytest.mark.usefixtures("one_thread")
LETTERS = "ABCD"


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory: pytest.TempPathFactory) -> dict:
    home = tmp_path_factory.mktemp("chat_eval_home")
    root = tmp_path_factory.mktemp("chat_eval_data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOFORGE_HOME", str(home))
        d = make_base(root)
        s = train_sft(d["base"], d["train"], val=d["val"], tag="eval", overrides=["train.max_steps=40"])
    rng = random.Random(7)
    mc = []
    for i in range(10):
        k = 2 + i % 3
        mc.append({"question": f"Which of these is number {i}?", "choices": {"text": [f"{j + i}" for j in range(k)],
                   "label": list(LETTERS[:k])}, "answerKey": LETTERS[i % k]})
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    gen = []
    for _ in range(8):
        c = conversation(rng, tool=True)["messages"]
        gen.append({"question": c[0]["content"], "answer": c[1]["content"][-1]["text"].strip()})
    (root / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    (root / "mc.yaml").write_text(f"""task: toy_mc_chat
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices.text}}}}"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
""")
    (root / "gen.yaml").write_text(f"""task: toy_gen_chat
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer.split('####')[-1].strip()}}}}"
generation_kwargs:
  max_gen_toks: 60
filter_list:
  - name: strict-match
    filter:
      - function: regex
        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
""")
    return {"home": home, "ckpt": Path(s["checkpoint_dir"]), "root": root, "mc": mc, "gen": gen}


def _load(sft_model):
    from nanoforge.infer.engine import load_checkpoint

    return load_checkpoint(sft_model["ckpt"])[:2]


@torch.no_grad()
def _greedy_with_tool(model, tok, prompt: list[int], budget: int) -> tuple[str, bool]:
    """Greedy decoding by full forward passes; a <|python_end|> runs the calculator on the code since
    <|python_start|> and forces <|output_start|>result<|output_end|>. Returns (text parts, ended)."""
    from nanoforge.infer.tools import calculator

    sp = {n: tok.special_id(n) for n in ("<|assistant_end|>", "<|python_start|>", "<|python_end|>",
                                         "<|output_start|>", "<|output_end|>", "<|bos|>")}
    ids, out, text_ids, code = list(prompt), [], [], None
    while len(out) < budget:
        nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        ids.append(nxt)
        out.append(nxt)
        if nxt in (sp["<|assistant_end|>"], sp["<|bos|>"]):
            return tok.decode(text_ids), nxt == sp["<|assistant_end|>"]
        if nxt == sp["<|python_start|>"]:
            code = []
        elif nxt == sp["<|python_end|>"] and code is not None:
            forced = [sp["<|output_start|>"], *tok.encode(calculator(tok.decode(code))), sp["<|output_end|>"]]
            forced = forced[:budget - len(out)]
            ids += forced
            out += forced
            code = None
        elif code is not None:
            code.append(nxt)
        else:
            text_ids.append(nxt)
    return tok.decode(text_ids), False


def test_eval_chat_scores_equal_a_hand_computation(sft_model, tmp_path) -> None:
    from nanoforge.data.chat import mc_question

    model, tok = _load(sft_model)
    out = tmp_path / "chat.json"
    report = eval_chat(sft_model["ckpt"], [sft_model["root"] / "mc.yaml", sft_model["root"] / "gen.yaml"], out=out,
                       batch_size=3)
    # multiple choice: argmax over the option letters' logits right after <|assistant_start|>
    hits, chance = [], []
    for doc in sft_model["mc"]:
        k = len(doc["choices"]["text"])
        prompt = tok.render_for_completion([{"role": "user", "content": mc_question(doc["question"],
                                                                                      doc["choices"]["text"])}])
        assert prompt[-1] == tok.special_id("<|assistant_start|>")
        logits = model(torch.tensor([prompt]))[0, -1]
        letters = [tok.encode(L)[0] for L in LETTERS[:k]]
        hits.append(float(int(logits[letters].argmax()) == LETTERS.index(doc["answerKey"])))
        chance.append(1 / k)
    row = report["results"]["toy_mc_chat"]
    assert row["acc,none"] == pytest.approx(sum(hits) / len(hits), abs=1e-12)
    base = sum(chance) / len(chance)
    assert row["centered,none"] == pytest.approx((sum(hits) / len(hits) - base) / (1 - base), abs=1e-12)
    # generation with the tool, "#### n" extraction, exact match; ended = stopped by <|assistant_end|>
    em, ended = [], []
    for doc in sft_model["gen"]:
        prompt = tok.render_for_completion([{"role": "user", "content": doc["question"]}])
        text, end = _greedy_with_tool(model, tok, prompt, 60)
        m = re.search(r"#### (\-?[0-9\.\,]+)", text)
        em.append(float((m.group(1) if m else "[invalid]") == doc["answer"].split("####")[-1].strip()))
        ended.append(float(end))
    row = report["results"]["toy_gen_chat"]
    assert row["exact_match,strict-match"] == pytest.approx(sum(em) / len(em), abs=1e-12)
    assert row["ended,none"] == pytest.approx(sum(ended) / len(ended), abs=1e-12)
    assert sum(ended) > 0  # the fine-tuned model learned to end its replies
    expected_core = (report["results"]["toy_mc_chat"]["centered,none"] + sum(em) / len(em)) / 2
    assert report["results"]["chatcore"]["chatcore,none"] == pytest.approx(expected_core, abs=1e-12)
    # lm-eval's layout: eval compare reads it
    from nanoforge.eval.compare import compare_results

    table = compare_results([out], fmt="md")
    assert "toy_mc_chat" in table and "chatcore" in table
    assert json.loads(out.read_text())["n-samples"]["toy_gen_chat"]["effective"] == 8


def test_eval_chat_cli_refuses_unknown_task_and_missing_data(sft_model, tmp_path, capsys) -> None:
    assert main(["eval", "chat", str(sft_model["ckpt"]), "--tasks", "nope_chat"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown chat task 'nope_chat'" in err and "arithmetic_chat" in err
    assert main(["eval", "chat", str(sft_model["ckpt"]), "--tasks", "arc_easy_chat"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ARC-Easy-test.jsonl does not exist" in err
