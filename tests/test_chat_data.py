"""Chat data: files in every shape the loader reads, GSM8K and multiple-choice conversion, TOML mixtures, a Hub
source through the download code, and the offline default chat data."""

from __future__ import annotations

import ast
import io
import json
import operator
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _chat_helpers import chat_tokenizer
from test_data_download import REPO, hub  # noqa: F401  (the loopback Hub fixture)

from nanoforge.data.chat import (
    ARITHMETIC_TRAIN,
    DEFAULT_CHAT_VERSION,
    default_chat_data,
    gsm8k_answer,
    gsm8k_messages,
    load_conversations,
    mc_question,
)
from nanoforge.errors import UserError

GSM_Q = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
         "How many clips did Natalia sell altogether in April and May?")
GSM_A = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
         "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


def write_jsonl(path: Path, rows: list, blank_lines: bool = False) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + ("\n\n" if blank_lines else "\n") for r in rows),
                    encoding="utf-8")
    return path


def chat(*texts: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


def test_gsm8k_rows_become_calculator_tool_calls(tmp_path: Path) -> None:
    assert gsm8k_messages(GSM_Q, GSM_A) == [
        {"role": "user", "content": GSM_Q},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Natalia sold 48/2 = "}, {"type": "python", "text": "48/2"},
            {"type": "python_output", "text": "24"},
            {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "}, {"type": "python", "text": "48+24"},
            {"type": "python_output", "text": "72"},
            {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"}]}]
    pq.write_table(pa.table({"question": [GSM_Q], "answer": [GSM_A]}), tmp_path / "gsm8k.parquet")
    (conv,) = load_conversations(tmp_path / "gsm8k.parquet")
    assert conv.messages == gsm8k_messages(GSM_Q, GSM_A) and conv.source == f"{tmp_path / 'gsm8k.parquet'}:1"


@pytest.mark.parametrize("text, expected", [("so #### 72", "72"), ("#### 1,000,000", "1000000"), ("#### -3.5", "-3.5"),
                                            ("the answer is 72", None), ("#### x", None)])
def test_gsm8k_answer(text: str, expected: str | None) -> None:
    assert gsm8k_answer(text) == expected


def test_multiple_choice_rows_become_lettered_questions(tmp_path: Path) -> None:
    arc = {"question": "Which is a gas?", "choices": {"text": ["ice", "steam", "rock"], "label": ["1", "2", "3"]},
           "answerKey": "2"}
    mmlu = {"question": "2+2?", "choices": ["3", "4", "5", "22"], "answer": 1, "subject": "math"}
    write_jsonl(tmp_path / "mc.jsonl", [arc, mmlu])
    a, m = load_conversations(tmp_path / "mc.jsonl")
    assert a.messages == [{"role": "user", "content": "Multiple Choice question: Which is a gas?\n- ice=A\n- steam=B\n"
                                                      "- rock=C\n\nRespond only with the letter of the correct answer."},
                          {"role": "assistant", "content": "B"}]
    assert m.messages[0]["content"] == mc_question("2+2?", ["3", "4", "5", "22"]) and m.messages[1]["content"] == "B"


SHAPED = {
    "messages": ({"messages": chat("hi", "hello")}, {}, chat("hi", "hello")),
    "lmsys_conversation": ({"conversation_id": "x", "model": "m", "conversation": chat("q", "a"), "turn": 1}, {},
                           chat("q", "a")),
    "dailydialog_list": ({"dialog": ["Hi!", "Hello.", "How are you?", "Fine.", "Bye"]}, {},
                         chat("Hi!", "Hello.", "How are you?", "Fine.")),
    "sharegpt": ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, {},
                 chat("q", "a")),
    "convlab_turns": ({"turns": [{"speaker": "user", "utterance": "book a table", "utt_idx": 0},
                                 {"speaker": "system", "utterance": "for how many?", "utt_idx": 1}]}, {},
                      chat("book a table", "for how many?")),
    "magpie": ({"instruction": "Name a prime.", "response": "7", "model": "x"}, {}, chat("Name a prime.", "7")),
    "alpaca": ({"instruction": "Add.", "input": "2 and 3", "output": "5"}, {}, chat("Add.\n\n2 and 3", "5")),
    "custom_fields": ({"prompt": "p", "completion": "c"}, {"shape": "instruction", "field": "prompt,completion"},
                      chat("p", "c")),
    "persona_chat": ({"user 1 personas": "I like cats.",
                      "Best Generated Conversation": "User 1: Hi! Do you like cats?\nUser 2: I do.\nNote: a lot.\n"
                                                     "User 1: Great.\nUser 2: Yes, they are fun.\nUser 1: Bye"},
                     {}, chat("Hi! Do you like cats?", "I do.\nNote: a lot.", "Great.", "Yes, they are fun.")),
    "speaker_transcript": ({"dialogue": "Alice: Hi.\nBob: Hello!\nAlice: Bye."}, {"shape": "transcript", "field": "dialogue"},
                           chat("Hi.", "Hello!")),
}


@pytest.mark.parametrize("name", list(SHAPED))
def test_other_public_shapes_import_with_a_shape_option(tmp_path: Path, name: str) -> None:
    row, options, expected = SHAPED[name]
    write_jsonl(tmp_path / "d.jsonl", [row])
    (conv,) = load_conversations(tmp_path / "d.jsonl", **options)
    assert conv.messages == expected


def test_files_folders_and_sources(tmp_path: Path) -> None:
    rows = [{"messages": chat(f"q{i}", f"a{i}")} for i in range(3)]
    write_jsonl(tmp_path / "a.jsonl", rows, blank_lines=True)
    (tmp_path / "b.json").write_text(json.dumps(rows[:2]), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "c.parquet")
    convs = load_conversations(tmp_path)
    assert [c.source for c in convs] == [f"{tmp_path / 'a.jsonl'}:{n}" for n in (1, 3, 5)] + \
        [f"{tmp_path / 'b.json'}:{n}" for n in (1, 2)] + [f"{tmp_path / 'c.parquet'}:1"]
    assert [c["messages"] for c in convs] == [r["messages"] for r in rows + rows[:2] + rows[:1]]


def test_mixture_epochs_weights_and_seeded_shuffle(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "a.jsonl", [{"messages": chat(f"a{i}", "x")} for i in range(10)])
    write_jsonl(tmp_path / "data" / "b.jsonl", [{"messages": chat(f"b{i}", "x")} for i in range(4)])
    write_jsonl(tmp_path / "data" / "c.jsonl", [{"messages": chat(f"c{i}", "x")} for i in range(6)])

    def mix(body: str, seed: int = 0) -> list[str]:
        (tmp_path / "m.toml").write_text(f"seed = {seed}\n{body}", encoding="utf-8")
        return [c.messages[0]["content"] for c in load_conversations(tmp_path / "m.toml")]

    body = ('[[source]]\npath = "data/a.jsonl"\nepochs = 0.5\n[[source]]\npath = "data/b.jsonl"\nepochs = 2.5\n'
            '[[source]]\npath = "data/c.jsonl"\n')
    got = mix(body)
    assert len(got) == 5 + 10 + 6
    assert sum(x.startswith("a") for x in got) == 5 and len({x for x in got if x.startswith("a")}) == 5
    assert all(got.count(f"b{i}") in (2, 3) for i in range(4)) and sum(x.startswith("b") for x in got) == 10
    assert sorted(x for x in got if x.startswith("c")) == [f"c{i}" for i in range(6)]
    assert mix(body) == got and mix(body, seed=1) != got
    weighted = mix('[[source]]\npath = "data/a.jsonl"\nweight = 1\n[[source]]\npath = "data/b.jsonl"\nweight = 3\n')
    assert sum(x.startswith("a") for x in weighted) == 4 and sum(x.startswith("b") for x in weighted) == 10


@pytest.mark.parametrize("body, message", [
    ('[[source]]\npath = "missing.jsonl"\n', r"m\.toml: source 1: .*missing\.jsonl does not exist"),
    ('[[source]]\npath = "a.jsonl"\nweights = 2\n', r"m\.toml: source 1: unknown keys weights"),
    ('[[source]]\npath = "a.jsonl"\nweight = 1\nepochs = 2\n', "weight or epochs, not both"),
    ('[[source]]\npath = "a.jsonl"\nepochs = -1\n', "epochs must be a number"),
    ("seed = 0\n", "needs at least one"),
    ("[[source]\n", "not valid TOML"),
])
def test_bad_mixtures_are_one_clear_error(tmp_path: Path, body: str, message: str) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"messages": chat("q", "a")}])
    (tmp_path / "m.toml").write_text(body, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        load_conversations(tmp_path / "m.toml")


@pytest.mark.parametrize("line3, message", [
    ({"messages": chat("q", "a") + [{"role": "assistant", "content": "again"}]},
     "d.jsonl:3: message 3: two assistant turns in a row"),
    ({"messages": [{"role": "robot", "content": "beep"}]}, "d.jsonl:3: message 1: unknown role 'robot'"),
    ({"messages": chat("q", "")}, "d.jsonl:3: message 2: empty assistant message"),
    ({"text": "just a document"}, "d.jsonl:3: cannot tell the shape of this row (fields: text)"),
    ('{"messages": [', "d.jsonl:3: not valid JSON"),
])
def test_bad_rows_name_the_file_and_line(tmp_path: Path, line3, message: str) -> None:
    good = json.dumps({"messages": chat("q", "a")})
    bad = line3 if isinstance(line3, str) else json.dumps(line3)
    (tmp_path / "d.jsonl").write_text(f"{good}\n{good}\n{bad}\n", encoding="utf-8")
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        load_conversations(tmp_path / "d.jsonl")


def test_a_hub_source_goes_through_the_download_code(hub, tmp_path: Path) -> None:  # noqa: F811
    buf = io.BytesIO()
    pq.write_table(pa.table({"question": [GSM_Q], "answer": [GSM_A]}), buf)
    hub.files["main/train-00000-of-00001.parquet"] = buf.getvalue()
    mixture = tmp_path / "m.toml"
    mixture.write_text(f'[[source]]\nhub = "{REPO}"\nfiles = "main/train-{{:05d}}-of-00001.parquet"\n'
                       'shape = "gsm8k"\nepochs = 3\n', encoding="utf-8")
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}", "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": "",
           "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    code = ("import sys, json; from nanoforge.data.chat import load_conversations; "
            "print(json.dumps([c.messages for c in load_conversations(sys.argv[1])]))")
    for _ in range(2):  # the second run finds the verified file and downloads nothing
        r = subprocess.run([sys.executable, "-c", code, str(mixture)], capture_output=True, text=True, env=env,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == [gsm8k_messages(GSM_Q, GSM_A)] * 3
    assert len(hub.gets) == 1


def _calc(expr: str) -> str:
    """An independent evaluator for the synthetic problems' integer arithmetic."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}

    def ev(n: ast.AST) -> float:
        if isinstance(n, ast.BinOp):
            return ops[type(n.op)](ev(n.left), ev(n.right))
        assert isinstance(n, ast.Constant)
        return n.value

    v = ev(ast.parse(expr, mode="eval").body)
    assert v == int(v)
    return str(int(v))


@pytest.fixture(scope="module")
def default_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    mp = pytest.MonkeyPatch()
    mp.setenv("NANOFORGE_HOME", str(tmp_path_factory.mktemp("chat_home")))
    yield default_chat_data()
    mp.undo()


def test_default_chat_data_is_built_offline_with_held_out_splits(default_data: Path) -> None:
    tok = chat_tokenizer()
    train, val = load_conversations(default_data / "train"), load_conversations(default_data / "val")
    for split in (train, val):
        kinds = {Path(c.source.rsplit(":", 1)[0]).stem for c in split}
        assert kinds == {"stdlib_qa", "arithmetic", "identity"}
    questions = {c.messages[0]["content"] for c in train}
    assert not any(c.messages[0]["content"] in questions for c in val)
    assert len(train) > 3000 and len(val) > 250
    arithmetic = [c for c in train + val if "arithmetic" in c.source]
    assert len(arithmetic) == ARITHMETIC_TRAIN + 200
    for c in arithmetic:
        parts = c.messages[1]["content"]
        calls = [(p["text"], q["text"]) for p, q in zip(parts, parts[1:]) if p["type"] == "python"]
        assert calls and all(q == _calc(p) for p, q in calls)
        assert gsm8k_answer(parts[-1]["text"]) == calls[-1][1]
    for c in train[:500] + val:
        ids, mask = tok.render_conversation(c)
        assert 0 < sum(mask) < len(ids)
    mixture = load_conversations(default_data / "train.toml")
    count = {k: sum(k in c.source for c in train) for k in ("stdlib_qa", "arithmetic", "identity")}
    # the default mixture: the arithmetic problems 1.25 times, a tenth of the stdlib questions, identity 4 times
    assert len(mixture) == round(1.25 * count["arithmetic"]) + round(0.1 * count["stdlib_qa"]) + 4 * count["identity"]


def test_default_chat_data_is_cached_and_rebuilt_on_a_version_change(default_data: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOFORGE_HOME", str(default_data.parents[1]))
    meta = default_data / "chat-data.json"
    stamp = (default_data / "train" / "arithmetic.jsonl").stat().st_mtime_ns
    assert default_chat_data() == default_data
    assert (default_data / "train" / "arithmetic.jsonl").stat().st_mtime_ns == stamp
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "version": 0}))
    assert default_chat_data() == default_data and json.loads(meta.read_text())["version"] == DEFAULT_CHAT_VERSION
    assert not list(default_data.parent.glob(".*tmp"))


def test_render_file_shows_one_line_or_all(tmp_path: Path) -> None:
    from nanoforge.data.chat import render_file

    tok = chat_tokenizer()
    write_jsonl(tmp_path / "d.jsonl", [{"messages": chat("q1", "a1")}, {"messages": chat("q2", "a2")}])
    one = render_file(tok, tmp_path / "d.jsonl", line=2, color=False)
    ids, mask = tok.render_conversation(chat("q2", "a2"))
    assert one.splitlines()[0] == f"{tmp_path / 'd.jsonl'}:2: {len(ids)} tokens, {sum(mask)} supervised"
    body = one.splitlines()[1]
    assert body.endswith(f"«<|assistant_end|>»({ids[-1]})") and body.startswith(f"<|bos|>({ids[0]})|")
    assert [int(x.split("(")[-1]) for x in body.split(")|")[:-1]] == ids[:-1]
    assert render_file(tok, tmp_path / "d.jsonl", color=False).count("supervised") == 2
    assert "(truncated)" in render_file(tok, tmp_path / "d.jsonl", line=1, max_tokens=3)
    with pytest.raises(UserError, match="d.jsonl: no conversation at line 7"):
        render_file(tok, tmp_path / "d.jsonl", line=7)


def test_the_synthetic_tool_outputs_are_what_the_engines_calculator_prints(default_data: Path) -> None:
    tools = pytest.importorskip("nanoforge.infer.tools")
    convs = load_conversations(default_data / "train" / "arithmetic.jsonl")[:300]
    calls = [(p["text"], q["text"]) for c in convs for p, q in zip(c.messages[1]["content"], c.messages[1]["content"][1:])
             if p["type"] == "python"]
    assert len(calls) >= 300 and all(tools.calculator(expr) == out for expr, out in calls)
