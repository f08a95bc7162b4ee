"""Shared pieces of the serve tests: tiny random-weight models on disk, a server on 127.0.0.1:0 in a thread,
and an engine wrapper whose steps can be held back (to fill a queue deterministically)."""

from __future__ import annotations

import json
import threading
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
