"""Shared pieces of the serve tests: tiny random-weight models on disk, a server on 127.0.0.1:0 in a thread,
and an engine wrapper whose steps can be held back (to fill a queue deterministically)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from _eval_helpers import make_checkpoint, make_tokenizer


def make_models(root: Path) -> dict[str, Path]:
    """A tokenizer and two checkpoints: "sft/chat" (a chat model) and "base/tiny" (a base model)."""
    tok = make_tokenizer(root)
    chat = make_checkpoint(root / "sft", tok, name="chat", seed=1)
    meta_path = next(chat.glob("meta_*.json"))
    meta = json.loads(meta_path.read_text())
    meta["phase"], meta["val_bpb"] = "sft", 2.345
    meta_path.write_text(json.dumps(meta))
    base = make_checkpoint(root / "base", tok, name="tiny", seed=2)
    return {"tokenizer": tok, "sft/chat": chat, "base/tiny": base}


class GatedEngine:
    """An engine whose `step` waits while the gate is closed."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.gate = threading.Event()
        self.gate.set()

    def add(self, *a: Any, **k: Any) -> Any:
        return self.engine.add(*a, **k)

    def cancel(self, rid: Any) -> None:
        self.engine.cancel(rid)

    def has_work(self) -> bool:
        return self.engine.has_work()

    def step(self) -> Any:
        self.gate.wait(30)
        return self.engine.step()


def http(method: str, url: str, body: bytes | dict | None = None, headers: dict[str, str] | None = None
         ) -> tuple[int, Any]:
    """(status, parsed JSON body) of a plain HTTP request, errors included."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


class ScriptedEngine:
    """Replies with a fixed script of (part, text) pieces, one piece per step and `delay` seconds a step:
    model output chosen by the test (markdown, hostile HTML, a tool call). A prompt whose last user message
    contains "long" gets `long_script`."""

    def __init__(self, tokenizer: Any, script: list[tuple[str, str]], long_script: list[tuple[str, str]],
                 delay: float = 0.03) -> None:
        self.tokenizer, self.script, self.long_script, self.delay = tokenizer, script, long_script, delay
        self.rows: dict[int, list] = {}
        self.next = 0

    def add(self, prompt_ids: list[int], params: Any) -> int:
        rid, self.next = self.next, self.next + 1
        text = self.tokenizer.decode(prompt_ids).rsplit("<|user_start|>", 1)[-1]  # the last user message
        self.rows[rid] = [self.long_script if "long" in text else self.script, 0, params.max_tokens]
        return rid

    def cancel(self, rid: int) -> None:
        self.rows.pop(rid, None)

    def has_work(self) -> bool:
        return bool(self.rows)

    def step(self) -> list:
        from nanoforge.infer.engine import Delta

        time.sleep(self.delay)
        out = []
        for rid, row in list(self.rows.items()):
            script, i, budget = row
            part, text = script[i]
            row[1] = i + 1
            done = row[1] >= len(script) or row[1] >= budget
            out.append(Delta(rid, [1], text, part == "python_output", ("stop" if row[1] >= len(script) else "length")
                             if done else None, part))
            if done:
                del self.rows[rid]
        return out
