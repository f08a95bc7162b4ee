"""`nanoforge chat`: one-shot answers as JSON, the bad-input cases as one line with exit 2, slash
commands, tool calls shown distinctly, and the interactive chat driven through a pseudo-terminal
(pexpect): a reply streams, /stats prints, Ctrl-C stops a reply and the chat goes on, Ctrl-C twice exits."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pytest
from _chat_helpers import chat_tokenizer
from _engine_helpers import Scripted
from _eval_helpers import make_checkpoint

from nanoforge.cli import main
from nanoforge.infer.chat import TerminalChat
from nanoforge.infer.engine import Engine, SamplingParams, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random model on the chat tokenizer, its context widened to 8192 (so a reply can be long)."""
    from nanoforge.checkpoint import load_model, save_checkpoint

    root = tmp_path_factory.mktemp("chatcli")
    ckpt = make_checkpoint(root, chat_tokenizer().save(root / "tok"))
    model, meta = load_model(ckpt)
    meta["model_config"]["max_seq_len"] = 8192
    meta["phase"] = "sft"
    save_checkpoint(root / "long", 10, model, None, meta)
    return root / "long"


def test_one_shot_json_reply_equals_the_engine(chat_ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["chat", str(chat_ckpt), "-p", "the model answers", "--temperature", "0", "--max-new-tokens", "12",
            "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    model, tok, _ = load_checkpoint(chat_ckpt)
    prompt = tok.render_for_completion([{"role": "user", "content": "the model answers"}])
    ref = Engine(model, tok).generate([prompt], SamplingParams(max_tokens=12))[0]
    assert out["reply"] == ref.text and out["finish_reason"] == ref.finish_reason
    assert out["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(ref.ids),
                            "total_tokens": len(prompt) + len(ref.ids), "cached_tokens": 0}
    assert out["timings"]["ttft_s"] > 0


@pytest.mark.parametrize("flags, words", [(["--temperature", "-1"], "temperature"), (["--top-p", "0"], "top_p"),
                                          (["--top-p", "1.5"], "top_p"), (["-p", "x " * 9000], "context")])
def test_bad_input_is_one_line_exit_2(chat_ckpt: Path, flags: list[str], words: str,
                                      capsys: pytest.CaptureFixture) -> None:
    args = ["chat", str(chat_ckpt), *flags] + ([] if "-p" in flags else ["-p", "hi"])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err


def test_checkpoint_without_tokenizer_is_one_line_exit_2(chat_ckpt: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(chat_ckpt, bare)
    for meta in bare.glob("meta_*.json"):
        m = json.loads(meta.read_text())
        m["tokenizer"] = {"path": str(tmp_path / "gone"), "name": "gone"}
        meta.write_text(json.dumps(m))
    assert main(["chat", str(bare), "-p", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer" in err


def test_tool_calls_show_distinctly_and_commands_work(chat_ckpt: Path, tmp_path: Path) -> None:
    model, tok, _ = load_checkpoint(chat_ckpt)
    sid = tok.special_id
    prompt = tok.render_for_completion([{"role": "user", "content": "hi"}])
    forced = 2 + len(tok.encode("7"))
    script = (prompt + [sid("<|python_start|>")] + tok.encode("3+4") + [sid("<|python_end|>")] + [0] * forced
              + tok.encode(" so 7") + [sid("<|assistant_end|>")])
    out = io.StringIO()
    chat = TerminalChat(Engine(Scripted(model.config, script), tok), SamplingParams(), out=out, color=False)
    chat.ask("hi")
    assert out.getvalue() == "⟨python 3+4 → 7⟩ so 7\n"
    assert chat.command("/temperature 0.5") and chat.params.temperature == 0.5
    chat.command("/top-p 2")
    assert "error: top_p must be in (0, 1]" in out.getvalue() and chat.params.top_p == 1.0
    chat.command("/system be brief")
    chat.command(f"/save {tmp_path / 'c.json'}")
    saved = json.loads((tmp_path / "c.json").read_text())["messages"]
    assert saved[0] == {"role": "system", "content": "be brief"} and saved[1]["content"] == "hi"
    assert saved[2]["content"][1] == {"type": "python_output", "text": "7"}
    chat.command("/clear")
    assert chat.conversation() == [saved[0]]
    chat.command(f"/load {tmp_path / 'c.json'}")
    assert chat.conversation() == saved
    (tmp_path / "bad.json").write_text('{"messages": [{"role": "robot", "content": "x"}]}')
    chat.command(f"/load {tmp_path / 'bad.json'}")
    assert out.getvalue().rstrip().splitlines()[-1].startswith("error: ") and chat.conversation() == saved
    assert not chat.command("/quit")


@pytest.mark.slow
def test_terminal_chat_through_a_pty(chat_ckpt: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, PYTHONPATH=str(ROOT), TERM="dumb", OMP_NUM_THREADS="1")
    child = pexpect.spawn(sys.executable, ["-m", "nanoforge", "chat", str(chat_ckpt), "--temperature", "0",
                                           "--max-new-tokens", "8", "--ignore-eos", "--no-color"],
                          env=env, encoding="utf-8", timeout=90)
    try:
        child.expect("/help for commands")
        child.expect("> ")
        child.sendline("hello")
        child.expect("\n> ")                           # a reply streamed, then the prompt again
        reply = child.before.split("hello", 1)[-1].strip()
        assert reply
        child.sendline("/stats")
        child.expect(r"time to first token [\d.]+ ms .* reply 8 tokens \(length\)")
        child.sendline("/max-tokens 8000")
        child.expect("max_tokens = 8000")
        child.sendline("tell me more")
        child.expect("tell me more\r\n")
        child.expect(".")                              # the reply is streaming ...
        child.sendintr()                               # ... Ctrl-C stops it
        child.expect(r"\[stopped\]")
        child.expect("> ")
        child.sendline("/stats")
        child.expect(r"reply (\d+) tokens \(cancelled\)")
        assert 0 < int(child.match.group(1)) < 8000
        child.expect("> ")
        child.sendline("and now?")                     # the chat goes on
        child.expect(r"and now\?\r\n")
        child.expect(".")
        child.sendintr()
        child.expect(r"\[stopped\]")
        child.expect("> ")
        child.sendintr()                               # at the prompt: a hint, still running
        child.expect("Ctrl-C again")
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_render_prints_one_line_of_a_file(chat_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from nanoforge.tokenizer.chat import format_rendered

    _, tok, _ = load_checkpoint(chat_ckpt)
    convs = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
             {"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]}]
    data = tmp_path / "c.jsonl"
    data.write_text("\n".join(json.dumps(c) for c in convs) + "\n")
    assert main(["chat", "render", str(data), "--line", "2", "--tokenizer", str(tok.path)]) == 0
    out = capsys.readouterr().out
    ids, mask = tok.render_conversation(convs[1])
    assert out.splitlines()[0].endswith(f"{len(ids)} tokens, {sum(mask)} supervised")
    assert format_rendered(tok, ids, mask, color=False) in out
    assert main(["chat", "render", str(data)]) == 2
