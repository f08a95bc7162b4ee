"""`nanoforge chat CKPT`: a terminal chat over the engine and a Session (the conversation's KV cache is
kept between turns). Replies stream; tool calls show as ⟨python code → result⟩ in their own colours.

Commands: /clear, /system TEXT, /temperature X, /top-k N, /top-p X, /seed N, /max-tokens N, /stats,
/save FILE, /load FILE, /help, /quit. A line ending in a backslash continues on the next line; a line
with only three double quotes starts or ends a multi-line block. Ctrl-C stops the reply being generated
(the chat goes on); at the prompt, a second Ctrl-C in a row (or Ctrl-D) exits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from nanoforge.errors import UserError
from nanoforge.home import atomic_write_json
from nanoforge.infer.engine import Completion, Engine, SamplingParams
from nanoforge.infer.session import Session

HELP = """commands:
  /clear               start a new conversation (keeps the system prompt)
  /system [TEXT]       set the system prompt (no text: remove it)
  /temperature X       0 = greedy        /top-k N   (0 = off)     /top-p X   (1 = off)
  /seed N              sampling seed     /max-tokens N            reply budget
  /stats               timings and token counts of the last reply
  /save FILE           write the conversation as {"messages": [...]} JSON
  /load FILE           read such a file (or a plain list of messages)
  /help, /quit         this text; leave (Ctrl-D works too)
a line ending in \\ continues; \"\"\" on its own line starts/ends a multi-line message;
Ctrl-C stops a reply, twice at the prompt exits."""

_PARAM_COMMANDS = {"/temperature": ("temperature", float), "/top-k": ("top_k", int), "/top-p": ("top_p", float),
                   "/seed": ("seed", int), "/max-tokens": ("max_tokens", int)}


def load_messages(path: str | os.PathLike, tokenizer: Any) -> list[dict[str, Any]]:
    """The messages of a conversation JSON file ({"messages": [...]} or a list), checked by rendering."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{p}: not a JSON conversation ({e})") from None
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list):
        raise UserError(f'{p}: expected {{"messages": [...]}} or a list of messages')
    if messages:
        tokenizer.render_conversation(messages, source=str(p))
    return messages


class TerminalChat:
    """The chat's state and commands; `run()` is the interactive loop, `ask()` one streamed reply."""

    def __init__(self, engine: Engine, params: SamplingParams, *, system: str | None = None,
                 out: TextIO | None = None, color: bool | None = None) -> None:
        self.engine = engine
        self.session = Session(engine)
        self.params = params
        self.out = out or sys.stdout
        if color is None:
            color = self.out.isatty() and not os.environ.get("NO_COLOR")
        self.color = color
        self.messages: list[dict[str, Any]] = []
        self.system = system or None
        self.last: Completion | None = None
        self._stop = False

    # ---- output ----------------------------------------------------------------------------------
    def _w(self, text: str, style: str = "") -> None:
        codes = {"tool": "\033[36m", "output": "\033[32m", "dim": "\033[2m", "warn": "\033[33m"}
        if self.color and style and text:
            text = f"{codes[style]}{text}\033[0m"
        self.out.write(text)
        self.out.flush()

    # ---- one reply -------------------------------------------------------------------------------
    def conversation(self) -> list[dict[str, Any]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def ask(self, text: str) -> Completion:
        """Stream the reply to `text`; Ctrl-C (SIGINT) stops it and keeps what was said."""
        self.messages.append({"role": "user", "content": text})
        self._stop = False
        restore = self._catch_sigint()
        part = "text"
        try:
            for d in self.session.stream(self.conversation(), self.params):
                if d.part != part:
                    if part == "python_output" or (part == "python" and d.part == "text"):
                        self._w("⟩", "tool")
                    if d.part == "python":
                        self._w("⟨python ", "tool")
                    elif d.part == "python_output":
                        self._w(" → ", "tool")
                    part = d.part
                self._w(d.text, {"python": "tool", "python_output": "output"}.get(d.part, ""))
                if self._stop:
                    break
        finally:
            restore()
        if part != "text":
            self._w("⟩", "tool")
        c = self.session.last
        self.last = c
        if c.finish_reason == "cancelled":
            self._w("\n[stopped]", "dim")
        self.out.write("\n")
        self.out.flush()
        reply = self.session.messages[-1]
        if c.ids and (reply["content"] if isinstance(reply["content"], str) else True):
            self.messages.append(reply)
        else:  # nothing was said: forget the question too
            self.messages.pop()
        return c

    def _catch_sigint(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def stop(signum: int, frame: Any) -> None:
            self._stop = True

        old = signal.signal(signal.SIGINT, stop)
        return lambda: signal.signal(signal.SIGINT, old)

    # ---- commands --------------------------------------------------------------------------------
    def stats(self) -> str:
        c = self.last
        if c is None:
            return "no reply yet"
        t = c.timings
        used = c.prompt_tokens + len(c.ids)
        ctx = self.engine.context
        return (f"time to first token {t['ttft_s'] * 1000:.1f} ms · {t['tokens_per_s']:.1f} tokens/s · "
                f"prompt {c.prompt_tokens} tokens ({int(t['prefill_tokens'])} prefilled, {c.cached_tokens} reused) · "
                f"reply {len(c.ids)} tokens ({c.finish_reason}) · context {used}/{ctx} ({100 * used / ctx:.0f}%)")

    def command(self, line: str) -> bool:
        """Run a slash command; False means quit. Bad arguments print one error line."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        try:
            if name in ("/quit", "/exit"):
                return False
            if name == "/help":
                self._w(HELP + "\n")
            elif name == "/clear":
                self.messages = []  # the session keeps its cache: a conversation that starts alike reuses it
                self._w("conversation cleared\n", "dim")
            elif name == "/system":
                self.system = arg or None
                self._w(f"system prompt {'set' if arg else 'removed'}\n", "dim")
            elif name in _PARAM_COMMANDS:
                field, kind = _PARAM_COMMANDS[name]
                if not arg:
                    self._w(f"{field} = {getattr(self.params, field)}\n")
                    return True
                try:
                    value = kind(arg)
                except ValueError:
                    raise UserError(f"{name} needs a {kind.__name__}, got {arg!r}") from None
                self.params = dataclasses.replace(self.params, **{field: value})
                self._w(f"{field} = {getattr(self.params, field)}\n", "dim")
            elif name == "/stats":
                self._w(self.stats() + "\n")
            elif name == "/save":
                if not arg:
                    raise UserError("/save needs a file name")
                atomic_write_json(Path(arg).expanduser(), {"messages": self.conversation()})
                self._w(f"saved {len(self.conversation())} messages to {arg}\n", "dim")
            elif name == "/load":
                if not arg:
                    raise UserError("/load needs a file name")
                messages = load_messages(Path(arg).expanduser(), self.engine.tokenizer)
                self.system = None
                if messages and messages[0].get("role") == "system":
                    self.system = messages[0].get("content")
                    messages = messages[1:]
                self.messages = list(messages)
                self._w(f"loaded {len(messages)} messages from {arg}\n", "dim")
            else:
                raise UserError(f"unknown command {name} (try /help)")
        except UserError as e:
            self._w(f"error: {e}\n", "warn")
        return True

    # ---- the loop --------------------------------------------------------------------------------
    def run(self, read: Callable[[str], str] = input) -> int:
        """The interactive loop: messages and commands until /quit, Ctrl-D or a second Ctrl-C."""
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        interrupts = 0
        while True:
            try:
                text = self._read(read)
            except EOFError:
                self.out.write("\n")
                return 0
            except KeyboardInterrupt:
                interrupts += 1
                if interrupts >= 2:
                    self.out.write("\n")
                    return 0
                self._w("\n(Ctrl-C again or Ctrl-D to exit, /help for commands)\n", "dim")
                continue
            interrupts = 0
            if not text.strip():
                continue
            if text.startswith("/"):
                if not self.command(text):
                    return 0
                continue
            try:
                self.ask(text)
            except UserError as e:  # e.g. the conversation no longer fits the context
                self.messages.pop()
                self._w(f"error: {e}\n", "warn")

    def _read(self, read: Callable[[str], str]) -> str:
        line = read("> ")
        if line.strip() == '"""':
            lines = []
            while (line := read("")).strip() != '"""':
                lines.append(line)
            return "\n".join(lines)
        lines = []
        while line.endswith("\\"):
            lines.append(line[:-1])
            line = read("… ")
        return "\n".join(lines + [line])


def one_shot(engine: Engine, params: SamplingParams, prompt: str, *, system: str | None = None) -> dict[str, Any]:
    """One reply without a terminal (`chat -p ... --json`): {"reply", "finish_reason", "usage", "timings"}."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    c = Session(engine).reply(messages, params)
    usage = {"prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.ids),
             "total_tokens": c.prompt_tokens + len(c.ids), "cached_tokens": c.cached_tokens}
    return {"reply": c.text, "finish_reason": c.finish_reason, "usage": usage,
            "timings": {k: round(v, 6) for k, v in c.timings.items()}, "message": c.message()}
