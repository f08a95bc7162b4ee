"""A conversation that keeps its KV cache between turns, so a new turn prefills only its new tokens
(llama.cpp's prompt cache): the chat CLI and the server hold one per conversation.

    session = Session(engine)
    messages = [{"role": "user", "content": "Was ist 2+3?"}]
    reply = session.reply(messages, SamplingParams(max_tokens=64))
    messages += [reply.message(), {"role": "user", "content": "Und mal 4?"}]
    for delta in session.stream(messages, SamplingParams()):   # prefills only the new user turn
        print(delta.text, end="")
    session.prefilled_tokens                                     # how many the last turn prefilled

When the messages continue the conversation the session produced (its reply passed back unchanged),
the prompt is the exact tokens the model saw and generated, followed by the rendering of what is new:
the reply is never re-tokenized. Otherwise (an edited or different conversation) the prompt is rendered
afresh and the longest common token prefix with the cache is reused, so an edit only costs the tokens
from the edit on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from nanoforge.infer.engine import CacheSnapshot, Completion, Delta, Engine, SamplingParams


class Session:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.messages: list[dict[str, Any]] = []   # the conversation so far, its last reply included
        self.prompt: list[int] = []                # the last turn's prompt ids
        self.last: Completion | None = None
        self.prefilled_tokens = 0
        self.cached_tokens = 0
        self._snapshot: CacheSnapshot | None = None
        self._ids: list[int] | None = None         # prompt + reply ids of the last turn, when it ended cleanly

    def reset(self) -> None:
        """Forget the conversation and its cache."""
        self.__init__(self.engine)

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """The ids the next turn starts from (see the module docstring)."""
        tok = self.engine.tokenizer
        full = tok.render_for_completion(messages)
        known = self.messages
        if self._ids is not None and known and messages[:len(known)] == known:
            rendered = tok.render_conversation(known).ids
            if full[:len(rendered)] == rendered:
                return self._ids + full[len(rendered):]
        return full

    def begin(self, messages: list[dict[str, Any]], params: SamplingParams | None = None) -> int:
        """Add the next turn to the engine (step API): returns its row id; call `end(rid)` once it has
        finished."""
        self.prompt = self.prompt_ids(messages)
        self._pending = list(messages)
        return self.engine.add(self.prompt, params, prefix=self._snapshot, keep_cache=True)

    def end(self, rid: int) -> Completion:
        """Take over the finished row's cache and result; returns the Completion."""
        c = self.engine.pop_result(rid)
        snap = self.engine.snapshot(rid)
        if snap is not None:
            self._snapshot = snap
        self.last = c
        self.prefilled_tokens = int(c.timings["prefill_tokens"])
        self.cached_tokens = c.cached_tokens
        self.messages = self._pending + [c.message()]
        stop_ids = self.engine.default_stop_ids
        clean = c.finish_reason == "stop" and bool(c.ids) and c.ids[-1] in stop_ids
        self._ids = self.prompt + c.ids if clean else None
        return c

    def stream(self, messages: list[dict[str, Any]], params: SamplingParams | None = None) -> Iterator[Delta]:
        """The next reply's deltas; closing the iterator early cancels the reply (the partial reply is
        kept as the session's last message)."""
        rid = self.begin(messages, params)
        try:
            while self.engine.result(rid) is None:
                for d in self.engine.step():
                    if d.rid == rid:
                        yield d
        finally:
            if self.engine.result(rid) is None:
                self.engine.cancel(rid)
            self.end(rid)

    def reply(self, messages: list[dict[str, Any]], params: SamplingParams | None = None) -> Completion:
        for _ in self.stream(messages, params):
            pass
        return self.last
