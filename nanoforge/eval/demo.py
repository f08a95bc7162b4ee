"""The bundled demo tasks' data (nanoforge/eval/tasks/demo_*.jsonl), generated from simple facts and
patterns written here, so a speedrun can run multiple-choice and generative evaluation with nothing downloaded.

    python -m nanoforge.eval.demo      # rewrites the bundled JSONL files
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

CAPITALS = {"Frankreich": "Paris", "Deutschland": "Berlin", "Italien": "Rom", "Spanien": "Madrid",
            "Österreich": "Wien", "Polen": "Warschau", "Portugal": "Lissabon", "Norwegen": "Oslo",
            "Schweden": "Stockholm", "Griechenland": "Athen", "Ungarn": "Budapest", "Irland": "Dublin"}
OPPOSITES = {"groß": "klein", "heiß": "kalt", "hell": "dunkel", "schnell": "langsam", "alt": "jung",
             "laut": "leise", "voll": "leer", "hart": "weich", "nass": "trocken", "früh": "spät"}
NUMBERS = ["eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun", "zehn", "elf", "zwölf"]
COLOURS = {"Der Himmel ist": "blau", "Gras ist": "grün", "Schnee ist": "weiß", "Eine Tomate ist": "rot",
           "Eine Banane ist": "gelb", "Kohle ist": "schwarz"}


def multiple_choice_docs(seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    docs = []

    def add(question: str, answer: str, pool: list[str]) -> None:
        wrong = rng.sample([p for p in pool if p != answer], 3)
        choices = wrong + [answer]
        rng.shuffle(choices)
        docs.append({"id": len(docs), "question": question, "choices": choices, "label": choices.index(answer)})

    for country, city in CAPITALS.items():
        add(f"Die Hauptstadt von {country} ist", city, list(CAPITALS.values()))
    for word, opposite in OPPOSITES.items():
        add(f"Das Gegenteil von {word} ist", opposite, list(OPPOSITES.values()))
    for i in range(len(NUMBERS) - 1):
        add(f"Nach {NUMBERS[i]} kommt", NUMBERS[i + 1], NUMBERS)
    for start, colour in COLOURS.items():
        add(start, colour, list(COLOURS.values()))
    return docs


def generative_docs(seed: int = 0, n: int = 24) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        docs.append({"id": i, "question": f"Was ist {a} plus {b}?", "answer": f"{a} plus {b} ist {a + b}. #### {a + b}"})
    return docs


def write_demo_data(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    out = []
    for name, docs in (("demo_mc.jsonl", multiple_choice_docs()), ("demo_gen.jsonl", generative_docs())):
        path = folder / name
        path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        out.append(path)
    return out


if __name__ == "__main__":
    write_demo_data(Path(__file__).parent / "tasks")
