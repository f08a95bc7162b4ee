"""Compare tokenizers with GerTokEval's metrics: `evaluate_tokenizers(config, data, out=...)`.

For each text t with n_t tokens (as the tokenizer's *default* encode gives them: nanoforge tokenizers add no
BOS, Hugging Face tokenizers add what `tokenizer.encode(text)` adds, as GerTokEval counts), b_t UTF-8
bytes, w_t whitespace-separated words, c_t characters and l_t lines (`len(text.splitlines())`):

    fertility            mean_t n_t / b_t        (n_t / w_t with unit="words")          lower is better
    vocab utilization    |distinct ids over all texts| / vocab size                       higher is better
    type-token ratio     |distinct ids over all texts| / sum_t n_t                        higher is better
    avg token length     mean_t c_t / n_t        (characters per token)                   higher is better
    tokens per line      mean_t n_t / l_t                                                  lower is better
    bytes per token      sum_t b_t / sum_t n_t   (corpus-wide, what bits-per-byte uses)    higher is better

Texts with an empty denominator (no bytes, words, tokens or lines) are left out of that mean. The JSON
holds per-text means with standard errors and, for each pair of tokenizers, the mean paired difference of
every per-text metric with its standard error.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from nanoforge import progress
from nanoforge.data.corpus import iter_documents
from nanoforge.errors import UserError
from nanoforge.home import atomic_path, atomic_write_json, atomic_write_text, read_json

METRICS = ["fertility", "vocab_utilization", "type_token_ratio", "avg_token_length", "tokens_per_line",
           "bytes_per_token"]
PER_TEXT = ["fertility", "avg_token_length", "tokens_per_line"]
HIGHER_IS_BETTER = {"fertility": False, "vocab_utilization": True, "type_token_ratio": True,
                    "avg_token_length": True, "tokens_per_line": False, "bytes_per_token": True}
LABELS = {"fertility": "Fertility", "vocab_utilization": "Vocab. util.", "type_token_ratio": "TTR",
          "avg_token_length": "Avg. token len.", "tokens_per_line": "Tokens/line", "bytes_per_token": "Bytes/token"}


def _load_encoder(name: str, spec: Any) -> tuple[Callable[[str], list[int]], int]:
    """(encode, vocab size) for one config entry."""
    if not isinstance(spec, dict) or "path" not in spec or "class" not in spec:
        raise UserError(f"eval config entry {name!r} must be {{\"class\": \"huggingface\"|\"nanoforge\", \"path\": ...}}")
    cls, path = spec["class"], str(spec["path"])
    if cls == "nanoforge":
        from nanoforge.home import resolve
        from nanoforge.tokenizer.core import Tokenizer

        if not (resolve(path, "tokenizers") / "nanoforge.json").is_file():
            raise UserError(f"eval config entry {name!r} points at nothing: no nanoforge tokenizer at {path}")
        tok = Tokenizer.load(path)
        return tok.encode, tok.vocab_size
    if cls == "huggingface":
        p = Path(path).expanduser()
        if not p.exists():
            raise UserError(f"eval config entry {name!r} points at nothing: {path} does not exist "
                            "(give a local Hugging Face tokenizer folder)")
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except Exception as e:
            raise UserError(f"eval config entry {name!r}: cannot load a tokenizer from {path} "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        return hf.encode, len(hf)
    raise UserError(f"eval config entry {name!r}: unknown class {cls!r} (expected huggingface or nanoforge)")


def _mean_se(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    if n < 2:
        return m, 0.0
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def text_stats(ids: list[int], text: str, unit: str) -> dict[str, float | None]:
    """Per-text values (None where the denominator is empty)."""
    n = len(ids)
    denom = len(text.encode("utf-8")) if unit == "bytes" else len(text.split())
    lines = len(text.splitlines())
    return {"fertility": n / denom if denom else None,
            "avg_token_length": len(text) / n if n else None,
            "tokens_per_line": n / lines if lines else None}


def evaluate_tokenizers(config_or_dict: str | os.PathLike | dict[str, Any],
                        data: str | os.PathLike | Sequence[str | os.PathLike], *, samples: int | None = None,
                        unit: str = "bytes", out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluate every tokenizer of the config on the documents under `data` (the first `samples` of them).
    Returns {"summary", "per_text", "pairwise", "tables", "files"} and writes results.{md,tex,csv,json} and
    one PNG per metric into `out`."""
    config = read_json(config_or_dict, "eval config") if not isinstance(config_or_dict, dict) else config_or_dict
    if not isinstance(config, dict) or not config:
        raise UserError("eval config must be a non-empty JSON object {\"name\": {\"class\": ..., \"path\": ...}}")
    if unit not in ("bytes", "words"):
        raise UserError(f"unknown unit {unit!r} (expected bytes or words)")
    if samples is not None and samples <= 0:
        raise UserError(f"--samples must be positive, got {samples}")
    encoders = {name: _load_encoder(name, spec) for name, spec in config.items()}
    texts = list(islice(iter_documents(data), samples))
    if not any(texts):
        raise UserError(f"no text to evaluate on in {data}")

    summary: dict[str, dict[str, float]] = {}
    per_text: dict[str, dict[str, list[float | None]]] = {}
    for name, (encode, vocab_size) in encoders.items():
        progress.log(f"evaluating {name} on {len(texts):,} texts")
        seen: set[int] = set()
        total_tokens = total_bytes = 0
        rows: dict[str, list[float | None]] = {m: [] for m in PER_TEXT}
        for text in progress.bar(texts, desc=name, unit="doc"):
            ids = encode(text)
            seen.update(ids)
            total_tokens += len(ids)
            total_bytes += len(text.encode("utf-8"))
            for k, v in text_stats(ids, text, unit).items():
                rows[k].append(v)
        per_text[name] = rows
        s: dict[str, float] = {m: _mean_se([x for x in rows[m] if x is not None])[0] for m in PER_TEXT}
        s["vocab_utilization"] = len(seen) / vocab_size
        s["type_token_ratio"] = len(seen) / total_tokens if total_tokens else float("nan")
        s["bytes_per_token"] = total_bytes / total_tokens if total_tokens else float("nan")
        s.update(vocab_size=vocab_size, tokens=total_tokens, texts=len(texts))
        summary[name] = s

    stats = {name: {m: dict(zip(("mean", "stderr"), _mean_se([x for x in rows[m] if x is not None])))
                    for m in PER_TEXT} for name, rows in per_text.items()}
    names = list(summary)
    pairwise: dict[str, dict[str, dict[str, float]]] = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            diffs = {}
            for m in PER_TEXT:
                d = [x - y for x, y in zip(per_text[a][m], per_text[b][m]) if x is not None and y is not None]
                diffs[m] = dict(zip(("mean", "stderr"), _mean_se(d)))
            pairwise[f"{a} - {b}"] = diffs

    tables = {"md": _markdown(summary, unit), "tex": _latex(summary, unit), "csv": _csv(summary)}
    result = {"summary": summary, "per_text": stats, "pairwise": pairwise, "unit": unit,
              "samples": len(texts), "tables": tables, "files": []}
    if out is not None:
        result["files"] = _write(Path(out), result)
    return result


def _best(summary: dict[str, dict[str, float]], metric: str) -> float:
    vals = [s[metric] for s in summary.values() if not math.isnan(s[metric])]
    if not vals:
        return float("nan")
    return max(vals) if HIGHER_IS_BETTER[metric] else min(vals)


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "nan"
    return f"{x:.4f}" if abs(x) >= 0.01 else f"{x:.3e}"


def _header(unit: str) -> list[str]:
    return [LABELS[m] + (f" (tok/{unit[:-1]})" if m == "fertility" else "") for m in METRICS]


def _markdown(summary: dict[str, dict[str, float]], unit: str) -> str:
    lines = ["| Tokenizer | Vocab | " + " | ".join(_header(unit)) + " |", "|---|---:|" + "---:|" * len(METRICS)]
    for name, s in summary.items():
        cells = []
        for m in METRICS:
            cell = _fmt(s[m])
            cells.append(f"**{cell}**" if s[m] == _best(summary, m) else cell)
        lines.append(f"| {name} | {s['vocab_size']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _latex(summary: dict[str, dict[str, float]], unit: str) -> str:
    def esc(s: str) -> str:
        return "".join("\\" + c if c in "&%$#_{}" else c for c in s)

    lines = [r"\begin{tabular}{l r " + "r " * len(METRICS) + "}", r"\toprule",
             "Tokenizer & Vocab & " + " & ".join(esc(h) for h in _header(unit)) + r" \\", r"\midrule"]
    for name, s in summary.items():
        cells = [rf"\textbf{{{_fmt(s[m])}}}" if s[m] == _best(summary, m) else _fmt(s[m]) for m in METRICS]
        lines.append(f"{esc(name)} & {s['vocab_size']} & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _csv(summary: dict[str, dict[str, float]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["tokenizer", "vocab_size", *METRICS])
    for name, s in summary.items():
        w.writerow([name, s["vocab_size"], *(repr(s[m]) for m in METRICS)])
    return buf.getvalue()


def _write(out: Path, result: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for ext, text in result["tables"].items():
        atomic_write_text(out / f"results.{ext}", text)
        files.append(str(out / f"results.{ext}"))
    payload = {k: v for k, v in result.items() if k not in ("tables", "files")}
    atomic_write_json(out / "results.json", json.loads(json.dumps(payload, default=float)))
    files.append(str(out / "results.json"))
    names = list(result["summary"])
    for m in METRICS:
        fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 2), 3.5))
        vals = [result["summary"][n][m] for n in names]
        errs = [result["per_text"][n][m]["stderr"] if m in PER_TEXT else 0.0 for n in names]
        ax.bar(names, vals, yerr=errs, color="#4c72b0", capsize=3)
        ax.set_title(LABELS[m] + (" (higher is better)" if HIGHER_IS_BETTER[m] else " (lower is better)"))
        ax.tick_params(axis="x", rotation=20)
        fig.tight_layout()
        with atomic_path(out / f"{m}.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        files.append(str(out / f"{m}.png"))
    return files
