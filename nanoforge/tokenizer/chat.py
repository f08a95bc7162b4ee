"""Chat rendering: the single place where conversations become token ids and loss masks.

    ids, mask = tok.render_conversation({"messages": [{"role": "user", "content": "2+2?"},
                                                      {"role": "assistant", "content": "4"}]})
    prompt = tok.render_for_completion(messages)       # ends with <|assistant_start|>

Layout (nanochat's): `<|bos|>`, then `<|user_start|>…<|user_end|>` and `<|assistant_start|>…<|assistant_end|>`
turns. A leading `system` message is merged into the first user message as `system + "\\n\\n" + user` (there is
no system token). Assistant content is a string or a list of parts `{"type": "text"|"python"|"python_output",
"text": …}`; a tool call is `<|python_start|>code<|python_end|>`, its result `<|output_start|>…<|output_end|>`.
OpenAI `tool_calls` plus the `role: "tool"` messages that answer them become the same python / python_output
parts, and an assistant message after those tool messages continues the same turn.

Mask: 1 on assistant text, on tool calls (both specials included) and on `<|assistant_end|>`; 0 on BOS, user
turns, `<|assistant_start|>` and tool outputs (both specials included). Text that looks like a special token is
encoded as plain text: only this module emits control tokens. Consecutive text parts are encoded as one string
(so the Hugging Face chat template, which emits them back to back, gives the same ids).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nanoforge.errors import UserError

if TYPE_CHECKING:
    from nanoforge.tokenizer.core import Tokenizer

SYSTEM_JOIN = "\n\n"
ROLES = ("system", "user", "assistant", "tool")
PART_TYPES = ("text", "python", "python_output")
CHAT_SPECIALS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                 "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")


class ChatFormatError(UserError):
    """A conversation that cannot be rendered (names its source and the message)."""


@dataclass
class Rendered:
    """Token ids and loss mask of one conversation; unpacks as `ids, mask = rendered`."""

    ids: list[int]
    mask: list[int]
    truncated: bool = False

    def __iter__(self) -> Iterator[list[int]]:
        yield self.ids
        yield self.mask

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Turn:
    role: str                       # "user" or "assistant"
    parts: list[tuple[str, str]]    # (type, text); a user turn has one ("text", …) part
    open: bool = False              # its last message is a tool result (generation goes on from there)


# ---- messages → turns -------------------------------------------------------------------------------
def _messages(conv: Any, source: str | None) -> tuple[list[Any], str]:
    """The message list of `conv` (a dict with "messages", a list of messages, or an object with .messages)
    and the source to name in errors."""
    src = source or getattr(conv, "source", None)
    if isinstance(conv, dict):
        src = src or conv.get("source")
        if "messages" not in conv:
            raise ChatFormatError(f"{src or 'conversation'}: no 'messages' field (expected a list of "
                                  "{'role': ..., 'content': ...} messages)")
        msgs = conv["messages"]
    elif hasattr(conv, "messages"):
        msgs = conv.messages
    else:
        msgs = conv
    src = str(src) if src else "conversation"
    if not isinstance(msgs, (list, tuple)):
        raise ChatFormatError(f"{src}: 'messages' is {type(msgs).__name__}, expected a list of messages")
    if not msgs:
        raise ChatFormatError(f"{src}: the conversation has no messages")
    return list(msgs), src


def _tool_call_code(call: Any, err: Any) -> str:
    """The python part of one OpenAI tool call. `arguments` (a dict, or OpenAI's JSON string) holding a single
    string field is unwrapped to that string (`{"expression": "2+2"}` → `2+2`); a JSON string is unwrapped only
    in its plain form `{"key": "value"}` / `{"key":"value"}` without backslashes (the chat template can do no
    more); anything else is used as JSON text."""
    import json

    if not isinstance(call, dict):
        err("a tool call must be an object with a 'function'")
    fn = call.get("function", call)
    if not isinstance(fn, dict) or "arguments" not in fn:
        err("a tool call needs function.arguments")
    args = fn["arguments"]
    if isinstance(args, dict):
        if len(args) == 1 and isinstance(next(iter(args.values())), str):
            return next(iter(args.values()))
        return json.dumps(args, ensure_ascii=False)
    if not isinstance(args, str):
        err(f"tool call arguments are {type(args).__name__}, expected a JSON string or an object")
    if args.startswith('{"') and args.endswith('"}') and "\\" not in args:
        inner = args[2:-2].split('"')
        if len(inner) == 3 and inner[1] in (": ", ":"):
            return inner[2]
    return args


def conversation_turns(conv: Any, *, source: str | None = None) -> list[Turn]:
    """Validate a conversation and group its messages into alternating user / assistant turns. Refuses (one
    ChatFormatError naming the source and message number) unknown roles, empty messages, a system message
    anywhere but first, roles that do not alternate, and tool messages without a tool call to answer."""
    msgs, src = _messages(conv, source)

    def fail(i: int, what: str) -> None:
        raise ChatFormatError(f"{src}: message {i + 1}: {what}")

    def role_of(i: int) -> str:
        m = msgs[i]
        if not isinstance(m, dict):
            fail(i, f"is {type(m).__name__}, expected an object with 'role' and 'content'")
        r = m.get("role")
        if r not in ROLES:
            fail(i, f"unknown role {r!r} (expected one of {', '.join(ROLES)})")
        return r

    def text_of(i: int, *, allow_empty: bool = False) -> str:
        c = msgs[i].get("content")
        if isinstance(c, list):  # OpenAI text parts
            texts = []
            for p in c:
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    fail(i, f"a {msgs[i]['role']} message may only hold text parts {{'type': 'text', 'text': ...}}")
                texts.append(p["text"])
            c = "".join(texts)
        if c is None and allow_empty:
            c = ""
        if c is None:
            fail(i, f"the {msgs[i]['role']} message has no content")
        if not isinstance(c, str):
            fail(i, f"content is {type(c).__name__}, expected a string")
        if not c and not allow_empty:
            fail(i, f"empty {msgs[i]['role']} message")
        return c

    def assistant_parts(i: int) -> list[tuple[str, str]]:
        c = msgs[i].get("content")
        if c is None or isinstance(c, str):
            return [("text", c)] if c else []
        if not isinstance(c, list):
            fail(i, f"content is {type(c).__name__}, expected a string or a list of parts")
        parts = []
        for p in c:
            if not isinstance(p, dict) or p.get("type") not in PART_TYPES:
                got = p.get("type") if isinstance(p, dict) else type(p).__name__
                fail(i, f"unknown part {got!r} (expected parts of type {', '.join(PART_TYPES)})")
            if not isinstance(p.get("text"), str):
                fail(i, f"a {p['type']} part needs a string 'text'")
            parts.append((p["type"], p["text"]))
        return parts

    n = len(msgs)
    turns: list[Turn] = []
    i = 0
    if role_of(0) == "system":
        system = text_of(0)
        if n < 2 or role_of(1) != "user":
            fail(0, "a system message must be followed by a user message")
        turns.append(Turn("user", [("text", system + SYSTEM_JOIN + text_of(1))]))
        i = 2
    while i < n:
        role = role_of(i)
        if role == "system":
            fail(i, "a system message is only allowed as the first message")
        if role == "tool":
            fail(i, "a tool message must answer a tool call of the assistant message before it")
        if role == "user":
            if turns and turns[-1].role == "user":
                fail(i, "two user messages in a row: roles must alternate user/assistant")
            turns.append(Turn("user", [("text", text_of(i))]))
            i += 1
            continue
        if not turns:
            fail(i, "the conversation must start with a user (or system) message")
        if turns[-1].role == "assistant":
            fail(i, "two assistant turns in a row: roles must alternate user/assistant")
        first, parts = i, []
        while True:
            calls = msgs[i].get("tool_calls") or []
            if not isinstance(calls, list):
                fail(i, "tool_calls must be a list")
            parts += assistant_parts(i)
            if not parts and not calls:
                fail(i, "empty assistant message")
            j = i
            i += 1
            for call in calls:
                parts.append(("python", _tool_call_code(call, lambda what, j=j: fail(j, what))))
                if i < n and role_of(i) == "tool":
                    parts.append(("python_output", text_of(i, allow_empty=True)))
                    i += 1
            if i < n and role_of(i) == "tool":
                fail(i, "more tool messages than the assistant's tool_calls" if calls else
                     "a tool message must answer a tool call of the assistant message before it")
            if calls and i < n and role_of(i) == "assistant":
                continue  # the answer after the tool results continues the same turn
            break
        if not parts:
            fail(first, "empty assistant message")
        turns.append(Turn("assistant", parts, open=msgs[i - 1]["role"] == "tool"))
    return turns


# ---- turns → ids ------------------------------------------------------------------------------------
def _check_specials(tok: Tokenizer) -> dict[str, int]:
    missing = [s for s in CHAT_SPECIALS if s not in tok.special_tokens]
    if missing:
        raise ChatFormatError(f"tokenizer {tok.name} has no chat special tokens ({', '.join(missing)} missing): "
                              "chat rendering needs a tokenizer trained with nanoforge's nine specials")
    return {s: tok.special_tokens[s] for s in CHAT_SPECIALS}


def _render(tok: Tokenizer, turns: list[Turn], *, close_open: bool) -> tuple[list[int], list[int]]:
    sp = _check_specials(tok)
    ids: list[int] = [sp["<|bos|>"]]
    mask: list[int] = [0]

    def add(tokens: Sequence[int], m: int) -> None:
        ids.extend(tokens)
        mask.extend([m] * len(tokens))

    for t, turn in enumerate(turns):
        if turn.role == "user":
            add([sp["<|user_start|>"]], 0)
            add(tok.encode(turn.parts[0][1]), 0)
            add([sp["<|user_end|>"]], 0)
            continue
        add([sp["<|assistant_start|>"]], 0)
        k, parts = 0, turn.parts
        while k < len(parts):
            kind, text = parts[k]
            if kind == "text":  # consecutive text parts are one string
                while k + 1 < len(parts) and parts[k + 1][0] == "text":
                    k += 1
                    text += parts[k][1]
                add(tok.encode(text), 1)
            elif kind == "python":
                add([sp["<|python_start|>"]], 1)
                add(tok.encode(text), 1)
                add([sp["<|python_end|>"]], 1)
            else:
                add([sp["<|output_start|>"]], 0)
                add(tok.encode(text), 0)
                add([sp["<|output_end|>"]], 0)
            k += 1
        if close_open or not (turn.open and t == len(turns) - 1):
            add([sp["<|assistant_end|>"]], 1)
    return ids, mask


def render_conversation(tok: Tokenizer, conv: Any, max_tokens: int | None = None, *,
                        source: str | None = None) -> Rendered:
    """Ids and loss mask of a whole conversation (every turn closed). `max_tokens` keeps the first
    `max_tokens` tokens and sets `.truncated`. Errors name `source` (or the conversation's own)."""
    if max_tokens is not None and max_tokens < 1:
        raise ChatFormatError(f"max_tokens must be at least 1 (got {max_tokens})")
    ids, mask = _render(tok, conversation_turns(conv, source=source), close_open=True)
    truncated = max_tokens is not None and len(ids) > max_tokens
    if truncated:
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    return Rendered(ids, mask, truncated)


def render_for_completion(tok: Tokenizer, conv: Any, *, source: str | None = None) -> list[int]:
    """The prompt generation starts from: a final complete assistant turn is dropped and `<|assistant_start|>`
    appended. A conversation whose last message is a tool result ends inside that open assistant turn
    instead (after `<|output_end|>`), so the model goes on from the tool's output."""
    turns = conversation_turns(conv, source=source)
    if turns[-1].role == "assistant" and not turns[-1].open:
        turns = turns[:-1]
    ids, _ = _render(tok, turns, close_open=False)
    if not (turns and turns[-1].role == "assistant"):
        ids.append(tok.special_tokens["<|assistant_start|>"])
    return ids


# ---- looking at it ----------------------------------------------------------------------------------
def format_rendered(tok: Tokenizer, ids: Sequence[int], mask: Sequence[int], *, color: bool = True,
                    with_ids: bool = True) -> str:
    """Tokens joined by '|', each with its id, supervised ones (mask 1) green and the rest red (nanochat's
    visualize_tokenization). Without colour, supervised tokens are wrapped as «token» instead."""
    green, red, gray, reset = "\033[92m", "\033[91m", "\033[90m", "\033[0m"
    out = []
    for i, m in zip(ids, mask):
        text = tok.decode([int(i)]).replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
        if color:
            piece = f"{green if m else red}{text}{reset}" + (f"{gray}({i}){reset}" if with_ids else "")
        else:
            piece = (f"«{text}»" if m else text) + (f"({i})" if with_ids else "")
        out.append(piece)
    return "|".join(out)
