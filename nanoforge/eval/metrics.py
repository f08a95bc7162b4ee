"""Task metrics computed exactly as lm-evaluation-harness computes them (so scores agree to the last digit):
acc / acc_norm for multiple choice, truthfulqa's mc2, exact match after regex extraction, and the standard
error of a mean (sample standard deviation / √n).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from typing import Any

import numpy as np


def multiple_choice(lls: Sequence[float], choices: Sequence[str], gold: int | Sequence[int]) -> dict[str, float]:
    """acc: argmax of the summed log-likelihoods is gold; acc_norm: argmax of log-likelihood divided by the
    continuation's length in characters (lm-eval divides by len(choice), the delimiter not included)."""
    lls_arr = np.asarray(lls, dtype=np.float64)
    lengths = np.array([float(len(c)) for c in choices])
    pred, pred_norm = int(np.argmax(lls_arr)), int(np.argmax(lls_arr / lengths))
    golds = {int(gold)} if isinstance(gold, (int, np.integer)) else {int(g) for g in gold}
    return {"acc": float(pred in golds), "acc_norm": float(pred_norm in golds)}


def mc2(lls: Sequence[float], labels: Sequence[int]) -> float:
    """truthfulqa mc2: the normalised probability mass of the true answers (labels 1)."""
    probs = np.exp(np.asarray(lls, dtype=np.float64))
    probs = probs / probs.sum()
    return float(probs[np.asarray(labels) == 1].sum())


def mean_stderr(values: Sequence[float]) -> float:
    """Sample standard deviation (n - 1) / √n, as lm-eval reports `<metric>_stderr`; NaN for n < 2."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def regex_extract(text: str, pattern: str, group_select: int = 0, fallback: str = "[invalid]") -> str:
    """lm-eval's `regex` filter: the `group_select`-th match of `pattern` (first non-empty group), stripped."""
    found = re.findall(pattern, text)
    if not found:
        return fallback
    m: Any = found[group_select]
    if isinstance(m, tuple):
        m = next((g for g in m if g), fallback)
    return m.strip()


def apply_filters(text: str, steps: Sequence[dict[str, Any]]) -> str:
    """Run one filter pipeline (lm-eval filter_list entry) over a generated text."""
    for step in steps:
        fn = step.get("function")
        if fn == "regex":
            text = regex_extract(text, step.get("regex_pattern", r"#### (\-?[0-9\.\,]+)"),
                                 int(step.get("group_select", 0)), step.get("fallback", "[invalid]"))
        elif fn == "lowercase":
            text = text.lower()
        elif fn == "uppercase":
            text = text.upper()
        elif fn == "remove_whitespace":
            text = text.lstrip()
        elif fn == "take_first":
            pass  # one response per document
        else:
            raise ValueError(f"unsupported filter function {fn!r} (supported: regex, lowercase, uppercase, "
                             f"remove_whitespace, take_first)")
    return text


def exact_match(prediction: str, reference: str, *, ignore_case: bool = False, ignore_punctuation: bool = False,
                regexes_to_ignore: Sequence[str] | None = None) -> float:
    for r in regexes_to_ignore or []:
        prediction, reference = re.sub(r, "", prediction), re.sub(r, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)
