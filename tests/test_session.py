"""Prefix reuse across turns: a session's next turn prefills only the new tokens, gives the reply a full
prefill of the same prompt gives, and falls back to the common prefix when an earlier message changes."""

from __future__ import annotations

import pytest
import torch
from _chat_helpers import chat_tokenizer
from _eval_helpers import make_checkpoint

from nanoforge.infer.engine import Engine, SamplingParams, load_checkpoint
from nanoforge.infer.session import Session

pytestmark = pytest.mark.usefixtures("one_thread")


class EndsAfter(torch.nn.Module):
    """The model, but `<|assistant_end|>` wins from the k-th token of every reply on (a prefill with
    more than one token starts a reply), so turns end cleanly after exactly k tokens."""

    def __init__(self, model: torch.nn.Module, end_id: int, k: int) -> None:
        super().__init__()
        self.inner, self.config, self.end_id, self.k = model, model.config, end_id, k
        self.count = 0

    def hidden(self, idx: torch.Tensor, cache=None) -> torch.Tensor:
        self.count = 1 if idx.shape[1] > 1 else self.count + 1
        return self.inner.hidden(idx, cache=cache)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = self.inner.logits(h)
        if self.count >= self.k:
            out[..., self.end_id] += 1e4
        return out


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    root = tmp_path_factory.mktemp("session")
    tok_path = chat_tokenizer().save(root / "tok")
    model, tok, _ = load_checkpoint(make_checkpoint(root, tok_path))
    return EndsAfter(model, tok.special_id("<|assistant_end|>"), 6), tok


def test_next_turn_prefills_only_new_tokens_and_matches_a_full_prefill(chat_model: tuple) -> None:
    model, tok = chat_model
    params = SamplingParams(max_tokens=20)
    session = Session(Engine(model, tok))
    messages = [{"role": "user", "content": "the model answers questions about numbers"}]
    first = session.reply(messages, params)
    prompt1 = list(session.prompt)
    assert prompt1 == tok.render_for_completion(messages) and session.prefilled_tokens == len(prompt1)
    assert first.finish_reason == "stop" and len(first.ids) == 6
    messages = messages + [first.message(), {"role": "user", "content": "and code"}]
    second = session.reply(messages, params)
    new_tail = tok.render_for_completion(messages)[len(tok.render_conversation(messages[:2]).ids):]
    assert session.prompt == prompt1 + first.ids + new_tail
    # the cache held prompt1 and the reply except its last token (sampled, never fed)
    assert session.cached_tokens == len(prompt1) + len(first.ids) - 1
    assert session.prefilled_tokens == 1 + len(new_tail)
    full = Engine(model, tok).generate([session.prompt], params)[0]
    assert second.ids == full.ids and second.text == full.text


def test_an_edited_earlier_message_falls_back_to_the_common_prefix(chat_model: tuple) -> None:
    model, tok = chat_model
    params = SamplingParams(max_tokens=20)
    session = Session(Engine(model, tok))
    m1 = [{"role": "user", "content": "Python functions strings lists"}]
    r1 = session.reply(m1, params)
    edited = [{"role": "user", "content": "Python functions and dictionaries"}, r1.message(),
              {"role": "user", "content": "tool call"}]
    r2 = session.reply(edited, params)
    prompt = tok.render_for_completion(edited)
    assert session.prompt == prompt  # nothing spliced: the conversation is not the session's
    in_cache = tok.render_for_completion(m1) + r1.ids[:-1]
    common = next(i for i, (a, b) in enumerate(zip(prompt, in_cache)) if a != b)
    assert 0 < session.cached_tokens == common < len(in_cache)
    assert session.prefilled_tokens == len(prompt) - common
    assert r2.ids == Engine(model, tok).generate([prompt], params)[0].ids


def test_a_cancelled_reply_keeps_the_partial_text(chat_model: tuple) -> None:
    model, tok = chat_model
    session = Session(Engine(model, tok))
    it = session.stream([{"role": "user", "content": "hello"}], SamplingParams(max_tokens=20))
    got = [next(it), next(it)]
    it.close()
    assert session.last.finish_reason == "cancelled" and session.last.ids == [t for d in got for t in d.token_ids]
    assert session.messages[-1]["role"] == "assistant" and not session.engine.has_work()
