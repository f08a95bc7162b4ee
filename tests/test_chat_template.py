"""The exported Jinja chat template: transformers' apply_chat_template gives exactly render_conversation's ids
(add_generation_prompt=False) and render_for_completion's ids (True), on seeded random conversations with
unicode, special-looking strings, system messages, tool parts and OpenAI tool_calls."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from _chat_helpers import chat_tokenizer, training_text
from _data_helpers import write_parquet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoforge.errors import UserError
from nanoforge.tokenizer import Tokenizer
from nanoforge.tokenizer.hf import export_hf

PIECES = ["Hallo", " Welt", "2+2", "x = 3 * (4 - 1)", "Grüße aus München", "日本語のテキスト", "👨‍👩‍👧‍👦 👍🏽", "\n", "\n\n",
          "  spaced  ", "\t", "<|assistant_start|>", "<|bos|>", "<|user_end|>", "<|python_start|>", "<|", "|>",
          "<", "|", "<|not_special|>", "\ue000", "\ue000\ue001", "<\ue000|", "\\", '"', '{"a": "b"}', "0.5", "-7",
          "def f(x):\n    return x", "ß", "é", "<b>", "</s>", "%", "1,000,000"]


def rand_text(rng: random.Random, allow_empty: bool = False) -> str:
    n = rng.randint(0 if allow_empty else 1, 5)
    return "".join(rng.choice(PIECES) for _ in range(n))


def rand_arguments(rng: random.Random, code: str):
    kind = rng.randrange(5)
    if kind == 0:
        return {"expression": code}
    if kind == 1:
        return json.dumps({"expression": code}, ensure_ascii=False)
    if kind == 2:
        return json.dumps({"expression": code}, ensure_ascii=False, separators=(",", ":"))
    if kind == 3:
        return {"expression": code, "precision": rng.randint(1, 5)}
    return code


def rand_assistant(rng: random.Random) -> list[dict]:
    """One assistant turn as messages: a string, parts, or OpenAI tool_calls with tool results."""
    kind = rng.randrange(3)
    if kind == 0:
        return [{"role": "assistant", "content": rand_text(rng)}]
    if kind == 1:
        parts = [{"type": rng.choice(["text", "text", "python", "python_output"]), "text": rand_text(rng, True)}
                 for _ in range(rng.randint(1, 5))]
        parts.append({"type": "text", "text": rand_text(rng)})
        return [{"role": "assistant", "content": parts}]
    msgs = []
    for _ in range(rng.randint(1, 2)):
        calls = [{"id": f"c{rng.randrange(99)}", "type": "function",
                  "function": {"name": "calculator", "arguments": rand_arguments(rng, rand_text(rng))}}
                 for _ in range(rng.randint(1, 2))]
        content = rng.choice([None, "", rand_text(rng), [{"type": "text", "text": rand_text(rng)}]])
        msgs.append({"role": "assistant", "content": content, "tool_calls": calls})
        for c in calls:
            out = rand_text(rng, True)
            msgs.append({"role": "tool", "tool_call_id": c["id"],
                         "content": out if rng.random() < 0.7 else [{"type": "text", "text": out}]})
    if rng.random() < 0.7:
        msgs.append({"role": "assistant", "content": rand_text(rng)})
    return msgs


def rand_conversation(rng: random.Random) -> list[dict]:
    msgs = []
    if rng.random() < 0.4:
        msgs.append({"role": "system", "content": rand_text(rng)})
    for t in range(rng.randint(1, 3)):
        user = rand_text(rng)
        msgs.append({"role": "user", "content": user if rng.random() < 0.8 else [{"type": "text", "text": user}]})
        if t < 2 or rng.random() < 0.7:
            msgs += rand_assistant(rng)
    return msgs


CONVERSATIONS = [rand_conversation(random.Random(seed)) for seed in range(80)]


@pytest.fixture(scope="module")
def toks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Tokenizer, object]]:
    """A tiktoken-engine tokenizer (rustbpe) and an hf-engine one (the GPT-NeoX recipe), each exported with
    the chat template and loaded back by AutoTokenizer."""
    from transformers import AutoTokenizer

    from nanoforge.tokenizer.train import train_tokenizer

    root = tmp_path_factory.mktemp("chat_template")
    data = root / "text"
    data.mkdir()
    write_parquet(data / "shard_00000.parquet", training_text())
    out = {}
    for key, tok in (("rustbpe", chat_tokenizer()),
                     ("neox", Tokenizer.load(train_tokenizer(data, vocab_size=600, backend="neox", out=root / "neox")))):
        export_hf(tok, root / f"hf-{key}", chat=True)
        out[key] = (tok, AutoTokenizer.from_pretrained(str(root / f"hf-{key}"), local_files_only=True))
    return out


def test_the_generator_covers_every_shape() -> None:
    flat = [m for c in CONVERSATIONS for m in c]
    assert sum(m["role"] == "system" for m in flat) >= 10
    assert sum(bool(m.get("tool_calls")) for m in flat) >= 20
    assert sum(m["role"] == "tool" for m in flat) >= 20
    assert sum(isinstance(m.get("content"), list) and m["role"] == "assistant" for m in flat) >= 10
    assert sum(c[-1]["role"] == "user" for c in CONVERSATIONS) >= 5
    assert sum(c[-1]["role"] == "tool" for c in CONVERSATIONS) >= 3
    assert sum("<|" in json.dumps(c, ensure_ascii=False) for c in CONVERSATIONS) >= 40


@pytest.mark.parametrize("key", ["rustbpe", "neox"])
def test_apply_chat_template_gives_our_ids(toks, key: str) -> None:
    tok, hf = toks[key]
    for i, conv in enumerate(CONVERSATIONS):
        ours = tok.render_conversation(conv).ids
        theirs = hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=False)["input_ids"]
        assert theirs == ours, (i, hf.apply_chat_template(conv, tokenize=False))
        prompt = tok.render_for_completion(conv)
        theirs = hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)["input_ids"]
        assert theirs == prompt, (i, hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True))


TRICKY = st.lists(st.sampled_from(list("<|>\ue000\ue001 \n\r\tab1_") + ["<|bos|>", "<|user_end|>", "é", "👍"]),
                  min_size=1, max_size=12).map("".join)
ANY_TEXT = st.one_of(TRICKY, st.text(min_size=1, max_size=20))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ANY_TEXT, ANY_TEXT, ANY_TEXT, ANY_TEXT)
def test_apply_chat_template_gives_our_ids_on_any_text(toks, a: str, b: str, code: str, out: str) -> None:
    tok, hf = toks["rustbpe"]
    conv = [{"role": "system", "content": a}, {"role": "user", "content": b},
            {"role": "assistant", "content": [{"type": "text", "text": b}, {"type": "python", "text": code},
                                              {"type": "python_output", "text": out}, {"type": "text", "text": a}]}]
    assert hf.apply_chat_template(conv)["input_ids"] == tok.render_conversation(conv).ids
    assert hf.apply_chat_template(conv, add_generation_prompt=True)["input_ids"] == tok.render_for_completion(conv)


def _dict_arguments_with_several_fields(conv: list[dict]) -> bool:
    return any(isinstance(tc["function"]["arguments"], dict) and len(tc["function"]["arguments"]) > 1
               for m in conv for tc in m.get("tool_calls") or [])


def test_minijinja_renders_the_template_to_our_ids(toks) -> None:
    """MiniJinja (the Rust engine TGI renders chat templates with) gives the same ids; not for tool arguments
    that stay JSON, where its `tojson` escapes < and > as HTML (transformers' does not)."""
    minijinja = pytest.importorskip("minijinja")
    from transformers.utils.chat_template_utils import _normalize_chat_messages

    from nanoforge.tokenizer.hf import chat_template

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = minijinja.Environment(templates={"chat": chat_template()}, globals={"raise_exception": raise_exception})
    env.trim_blocks = env.lstrip_blocks = True
    tok, hf = toks["rustbpe"]
    checked = 0
    for conv in CONVERSATIONS:
        if _dict_arguments_with_several_fields(conv):
            continue
        msgs = _normalize_chat_messages(conv)  # what transformers and TGI do: keys whose value is None dropped
        for prompt, ours in ((False, tok.render_conversation(conv).ids), (True, tok.render_for_completion(conv))):
            text = env.render_template("chat", messages=msgs, add_generation_prompt=prompt)
            assert hf(text, add_special_tokens=False)["input_ids"] == ours
            checked += 1
    assert checked >= 100


def test_apply_chat_template_on_openai_message_objects(toks) -> None:
    """Messages as the openai client's pydantic objects (content=None, arguments a JSON string)."""
    pytest.importorskip("openai")
    from openai.types.chat import ChatCompletionMessage

    tok, hf = toks["rustbpe"]
    reply = ChatCompletionMessage.model_validate(
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "calculator", "arguments": '{"expression": "6*7"}'}}]})
    conv = [{"role": "user", "content": "6*7?"}, reply, {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    plain = [conv[0], reply.model_dump(exclude_none=True), conv[2]]
    assert hf.apply_chat_template(conv, add_generation_prompt=True)["input_ids"] == tok.render_for_completion(plain)


def test_the_export_still_decodes_and_tokenizes_plain_text(toks) -> None:
    tok, hf = toks["rustbpe"]
    for text in ("Grüße aus München 👍🏽", "x = 3 * (4 - 1)\n", "<\ue000|"[:1] + "plain"):
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    conv = CONVERSATIONS[0]
    ids = tok.render_conversation(conv).ids
    assert hf.decode(ids) == tok.decode(ids)


def test_chat_export_refuses_a_tokenizer_without_chat_specials(tmp_path: Path) -> None:
    tok = chat_tokenizer()
    bare = Tokenizer.from_ranks(tok.ranks, tok.pattern, ["<|endoftext|>"], name="bare")
    with pytest.raises(UserError, match="lacks the chat special tokens"):
        export_hf(bare, tmp_path / "hf", chat=True)
    with pytest.raises(UserError, match="has no chat special tokens"):
        bare.render_conversation([{"role": "user", "content": "hi"}])


def test_export_of_a_chat_checkpoint_writes_the_template(tmp_path: Path) -> None:
    from _eval_helpers import make_checkpoint, make_tokenizer
    from transformers import AutoTokenizer, GenerationConfig

    from nanoforge.cli import main
    from nanoforge.export.hf import export_hf as export_model

    ckpt = make_checkpoint(tmp_path, make_tokenizer(tmp_path), name="chat")
    base = export_model(ckpt, tmp_path / "base")
    assert not (base / "chat_template.jinja").exists()
    assert "chat_template" not in json.loads((base / "tokenizer_config.json").read_text())
    meta = ckpt / "meta_000010.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "phase": "sft"}))
    out = export_model(ckpt, tmp_path / "sft")
    tok = Tokenizer.load(tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    for conv in CONVERSATIONS[:10]:
        assert hf.apply_chat_template(conv)["input_ids"] == tok.render_conversation(conv).ids
    assert GenerationConfig.from_pretrained(out).eos_token_id == [tok.special_id("<|assistant_end|>"), tok.bos_id]
    # lm-eval --apply_chat_template renders the template to a string, then tokenizes it
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(out), device="cpu", batch_size=1)
    ends_with_user = [c for c in CONVERSATIONS if c[-1]["role"] == "user"]
    assert ends_with_user
    for conv in ends_with_user:
        assert lm.tok_encode(lm.apply_chat_template(conv)) == tok.render_for_completion(conv)
    assert main(["export", "hf", str(ckpt), "--out", str(tmp_path / "plain"), "--no-chat-template"]) == 0
    assert not (tmp_path / "plain" / "chat_template.jinja").exists()
