"""Fixtures for the chat-training and chat-eval tests: synthetic conversations, a tokenizer trained on
their text, and a small base checkpoint (the ci preset's model, a few base steps on the same text)."""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Greta", "Hugo"]
THINGS = ["apples", "books", "cats", "stones", "trees", "cups", "birds", "coins"]


def conversation(rng: random.Random, tool: bool = False) -> dict:
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    question = f"{name} has {a} {thing} and finds {b} more. How many {thing} does {name} have now?"
    if tool:
        content = [{"type": "text", "text": f"{name} has {a} + {b} "},
                   {"type": "python", "text": f"{a}+{b}"},
                   {"type": "python_output", "text": str(a + b)},
                   {"type": "text", "text": f" {thing}.\n#### {a + b}"}]
    else:
        content = f"{name} has {a} + {b} = {a + b} {thing}.\n#### {a + b}"
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": content}]
    if rng.random() < 0.3:
        messages += [{"role": "user", "content": f"Thank you, {name} is happy."},
                     {"role": "assistant", "content": "You are welcome."}]
    return {"messages": messages}


def write_conversations(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [conversation(rng, tool=i % 3 == 0) for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def text_of(path: Path) -> str:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        for m in json.loads(line)["messages"]:
            c = m["content"]
            out.append(c if isinstance(c, str) else "".join(p["text"] for p in c))
    return "\n\n".join(out)


def make_base(root: Path, *, steps: int = 20) -> dict[str, Path]:
    """A 512-token tokenizer and a base checkpoint trained `steps` ci steps on the conversations' text."""
    from nanoforge.config import load_config
    from nanoforge.data.tokenize import tokenize_corpus
    from nanoforge.tokenizer.train import train_tokenizer
    from nanoforge.train.loop import train

    chat = write_conversations(root / "chat" / "train.jsonl", 240, seed=0)
    write_conversations(root / "chat" / "val.jsonl", 24, seed=1)
    (root / "text").mkdir(parents=True, exist_ok=True)
    (root / "text" / "docs.txt").write_text(text_of(chat), encoding="utf-8")
    tok = train_tokenizer(root / "text", vocab_size=512, backend="rustbpe", out=root / "tok", force=True)
    tokens = tokenize_corpus(root / "text", tok, out=root / "tokens", val_docs=2, workers=1, split_blank_lines=True)
    cfg = load_config(preset="ci", overrides=[f"train.max_steps={steps}", "train.eval_every=0"])
    summary = train(cfg, tokens=str(tokens), tag="chatbase")
    return {"tok": tok, "tokens": tokens, "base": Path(summary["checkpoint_dir"]),
            "train": chat, "val": root / "chat" / "val.jsonl"}
