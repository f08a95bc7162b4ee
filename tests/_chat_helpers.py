"""A small real tokenizer with the nine chat specials (rustbpe on generated mixed text), for chat tests."""

from __future__ import annotations

import random

from nanoforge.tokenizer import NANOCHAT_PATTERN, SPECIAL_TOKENS, Tokenizer

WORDS = ("the model answers questions about numbers and code while users ask for help with "
         "Python functions strings lists dictionaries calculator results Grüße Straße München "
         "日本語 中文 emoji 👍 tool call output assistant user system").split()


def training_text(seed: int = 0, n: int = 3000) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n // 10):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 25))]
        docs.append(" ".join(words) + f" {rng.randint(0, 9999)} + {rng.randint(0, 999)} = ?\n"
                    f"def f(x):\n    return x * {rng.randint(2, 99)}\n<|not_special|> <b>tag</b>")
    return docs


def chat_tokenizer(vocab_size: int = 700) -> Tokenizer:
    import rustbpe

    r = rustbpe.Tokenizer()
    r.train_from_iterator(iter(training_text()), vocab_size - len(SPECIAL_TOKENS), pattern=NANOCHAT_PATTERN)
    ranks = {bytes(b): i for b, i in r.get_mergeable_ranks()}
    return Tokenizer.from_ranks(ranks, NANOCHAT_PATTERN, SPECIAL_TOKENS, name="chat-test")
