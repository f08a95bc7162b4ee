"""Compare tokenizers with GerTokEval's metrics: `evaluate_tokenizers(config, data, out=...)`.

The numbers are GerTokEval's (stefan-it/german-tokenizer-benchmark), computed by its rules:
- text units: every document as `str(text).strip()`, empty and whitespace-only documents dropped (and not
  counted against `samples`), the first N in file order (a parquet value "nan" is dropped too, as there);
- tokens: each tokenizer's *default* encode (nanoforge tokenizers add no BOS, Hugging Face tokenizers add
  what `tokenizer.encode(text)` adds); vocabulary size: `Tokenizer.vocab_size` / `len(get_vocab())`;
- for a text t with n_t tokens, b_t UTF-8 bytes, w_t = len(t.split()) words, c_t characters and
  l_t = len(t.split("\\n")) lines (not splitlines(): they differ on \\u2028, \\x0c, a lone \\r):

    fertility            mean_t n_t / b_t  (n_t / w_t with unit="words"; texts with b_t = 0 left out)
    vocab utilization    |distinct ids| / vocab size                                  (pooled)
    type-token ratio     |distinct ids| / sum_t n_t                                   (pooled)
    avg token length     mean_t c_t / n_t                      (texts with n_t > 0)
    tokens per line      mean_t n_t / l_t                      (texts with n_t > 0)
    bytes per token      sum_t b_t / sum_t n_t                 (ours: what bits-per-byte uses)
    Rényi entropy H_a    1/(1-a) log2 sum_i p_i^a, H_1 = -sum_i p_i log2 p_i, p over the pooled ids
    compression ratio    mean_t u_t / n_t                      (u_t: cost unit, see below)
    avg token rank       mean over all tokens of the token's frequency rank (1 = most frequent)

With several datasets (GerTokEval's "languages", `datasets=` in its dataset-configs.json format) the
metrics above are computed pooled over all datasets and per dataset, and the Tokenizer Fairness Gini
across datasets is  TFG = sum_i sum_j |c_i - c_j| / (2 n^2 mu)  with c_d = sum_t n_t / sum_t u_t over
dataset d and mu = mean_d c_d. The cost unit u_t is one per text by default (GerTokEval without
`--measurement-config`: c_d is tokens per text), or bytes / words (`cost_unit=`; GerTokEval with a
bytes / words measurement config, which also sets the fertility unit there).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from nanoforge import progress
from nanoforge.data.corpus import iter_file, list_files
from nanoforge.errors import UserError
from nanoforge.home import atomic_path, atomic_write_json, atomic_write_text, read_json

RENYI_ALPHAS = (1.0, 2.0, 2.5, 3.0)
METRICS = ["fertility", "vocab_utilization", "type_token_ratio", "avg_token_length", "tokens_per_line",
           "bytes_per_token"]
INFO_METRICS = [f"renyi_{a}" for a in RENYI_ALPHAS] + ["compression_ratio", "avg_token_rank"]
PER_TEXT = ["fertility", "avg_token_length", "tokens_per_line", "compression_ratio"]
# Our reading of each metric; GerTokEval's LaTeX tables bold the *highest* tokens per line instead.
HIGHER_IS_BETTER = {"fertility": False, "vocab_utilization": True, "type_token_ratio": True,
                    "avg_token_length": True, "tokens_per_line": False, "bytes_per_token": True,
                    **{f"renyi_{a}": True for a in RENYI_ALPHAS}, "compression_ratio": True,
                    "avg_token_rank": False, "gini": False}
GERTOKEVAL_HIGHER_IS_BETTER = {**HIGHER_IS_BETTER, "tokens_per_line": True}
LABELS = {"fertility": "Fertility", "vocab_utilization": "Vocab. util.", "type_token_ratio": "TTR",
          "avg_token_length": "Avg. token len.", "tokens_per_line": "Tokens/line", "bytes_per_token": "Bytes/token",
          **{f"renyi_{a}": f"Rényi H (α={a:g})" for a in RENYI_ALPHAS}, "compression_ratio": "Compression",
          "avg_token_rank": "Avg. token rank", "gini": "Fairness Gini"}
UNITS = ("bytes", "words")
COST_UNITS = ("texts", "bytes", "words")


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
        return hf.encode, len(hf.get_vocab())
    raise UserError(f"eval config entry {name!r}: unknown class {cls!r} (expected huggingface or nanoforge)")


def load_texts(data: str | os.PathLike | Sequence[str | os.PathLike], samples: int | None = None) -> list[str]:
    """GerTokEval's text units of `data`: each document `str(doc).strip()`, empty ones dropped (a parquet
    value that strips to "nan" too, as pandas-based loading does there), the first `samples` in file order."""
    def units() -> Iterator[str]:
        for path in list_files(data):
            parquet = path.suffix == ".parquet"
            for doc in iter_file(path):
                text = str(doc).strip()
                if text and not (parquet and text == "nan"):
                    yield text

    out: list[str] = []
    for text in units():
        if samples is not None and len(out) >= samples:
            break
        out.append(text)
    return out


def load_datasets(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """GerTokEval's dataset-configs.json: {"languages": {KEY: {"name", "iso_code", "data_path"}}}. Relative
    data paths are taken from the current folder, else from the config file's folder."""
    path = Path(path)
    cfg = read_json(path, "datasets config")
    langs = cfg.get("languages") if isinstance(cfg, dict) else None
    if not isinstance(langs, dict) or not langs:
        raise UserError(f"{path}: expected {{\"languages\": {{KEY: {{\"name\", \"iso_code\", \"data_path\"}}}}}}")
    out = {}
    for key, entry in langs.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("data_path"), str):
            raise UserError(f"{path}: dataset {key!r} needs a \"data_path\" string")
        p = Path(entry["data_path"]).expanduser()
        if not p.is_absolute() and not p.exists() and (path.parent / p).exists():
            p = path.parent / p
        if not p.exists():
            raise UserError(f"{path}: dataset {key!r}: data_path {entry['data_path']} does not exist")
        out[str(key)] = {"name": str(entry.get("name", key)), "iso_code": str(entry.get("iso_code", "")),
                         "data_path": str(p)}
    return out


def _mean_se(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = math.fsum(xs) / n
    if n < 2:
        return m, 0.0
    var = math.fsum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def _units(text: str, unit: str) -> int:
    if unit == "bytes":
        return len(text.encode("utf-8"))
    if unit == "words":
        return len(text.split())
    return 1  # "texts"


def text_stats(ids: list[int], text: str, unit: str, cost_unit: str = "texts") -> dict[str, float | None]:
    """Per-text values (None where GerTokEval leaves the text out of that mean)."""
    n = len(ids)
    denom, cost = _units(text, unit), _units(text, cost_unit)
    return {"fertility": n / denom if denom else None,
            "avg_token_length": len(text) / n if n else None,
            "tokens_per_line": n / len(text.split("\n")) if n else None,
            "compression_ratio": cost / n if n and cost and text.strip() else None}


def renyi_entropy(counts: Counter, alpha: float) -> float:
    """Rényi entropy of order `alpha` in bits of the distribution given by `counts` (Shannon at 1)."""
    total = sum(counts.values())
    if total == 0:
        return 0.0
    ps = [c / total for c in counts.values() if c > 0]
    if alpha == 1.0:
        return -math.fsum(p * math.log2(p) for p in ps)
    s = math.fsum(p ** alpha for p in ps)
    return math.log2(s) / (1 - alpha) if s > 0 else 0.0


def average_token_rank(counts: Counter) -> float:
    """Mean over all tokens of the token's rank by frequency (1 = most frequent); ties do not change it."""
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return math.fsum(rank * c for rank, (_, c) in enumerate(counts.most_common(), 1)) / total


def gini(costs: Sequence[float]) -> float:
    """Tokenizer Fairness Gini of per-dataset costs: sum_i sum_j |c_i - c_j| / (2 n^2 mean)."""
    n = len(costs)
    mu = math.fsum(costs) / n if n else 0.0
    if n < 2 or mu <= 0:
        return 0.0
    return math.fsum(abs(a - b) for a in costs for b in costs) / (2 * n * n * mu)


def lorenz_curve(costs: dict[str, float]) -> dict[str, Any]:
    """Lorenz curve of the costs (datasets sorted cheapest first): x = share of datasets, y = share of cost."""
    items = sorted(costs.items(), key=lambda kv: kv[1])
    total = math.fsum(costs.values())
    x, y, acc = [0.0], [0.0], 0.0
    for i, (_, c) in enumerate(items, 1):
        acc += c
        x.append(i / len(items))
        y.append(acc / total if total else 0.0)
    return {"x": x, "y": y, "datasets": [k for k, _ in items]}


def _summarise(texts: list[str], ids: list[list[int]], vocab_size: int, unit: str,
               cost_unit: str) -> tuple[dict[str, float], dict[str, list[float | None]]]:
    rows: dict[str, list[float | None]] = {m: [] for m in PER_TEXT}
    counts: Counter = Counter()
    total_bytes = total_tokens = total_cost = 0
    for text, t_ids in zip(texts, ids):
        counts.update(t_ids)
        total_tokens += len(t_ids)
        total_bytes += len(text.encode("utf-8"))
        total_cost += _units(text, cost_unit)
        for k, v in text_stats(t_ids, text, unit, cost_unit).items():
            rows[k].append(v)
    s: dict[str, float] = {m: _mean_se([x for x in rows[m] if x is not None])[0] for m in PER_TEXT}
    if math.isnan(s["compression_ratio"]):
        s["compression_ratio"] = 1.0  # GerTokEval's value when no text has tokens
    s["vocab_utilization"] = len(counts) / vocab_size
    s["type_token_ratio"] = len(counts) / total_tokens if total_tokens else float("nan")
    s["bytes_per_token"] = total_bytes / total_tokens if total_tokens else float("nan")
    for a in RENYI_ALPHAS:
        s[f"renyi_{a}"] = renyi_entropy(counts, a)
    s["avg_token_rank"] = average_token_rank(counts)
    s["cost"] = total_tokens / total_cost if total_cost else float("nan")
    s.update(vocab_size=vocab_size, tokens=total_tokens, texts=len(texts))
    return s, rows


def evaluate_tokenizers(config_or_dict: str | os.PathLike | dict[str, Any],
                        data: str | os.PathLike | Sequence[str | os.PathLike] | None = None, *,
                        samples: int | None = None, unit: str = "bytes", cost_unit: str = "texts",
                        datasets: str | os.PathLike | dict[str, Any] | None = None, gertokeval_bold: bool = False,
                        out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluate every tokenizer of the config on `data` (the first `samples` text units) or on every dataset
    of a GerTokEval dataset config (`datasets`, `samples` per dataset). Returns {"summary", "per_text",
    "pairwise", "datasets", "gini", "tables", "files"}; writes results.{md,tex,csv,json} and PNG plots into
    `out`. `gertokeval_bold` bolds as GerTokEval's tables do (the highest tokens per line)."""
    config = read_json(config_or_dict, "eval config") if not isinstance(config_or_dict, dict) else config_or_dict
    if not isinstance(config, dict) or not config:
        raise UserError("eval config must be a non-empty JSON object {\"name\": {\"class\": ..., \"path\": ...}}")
    if unit not in UNITS:
        raise UserError(f"unknown unit {unit!r} (expected bytes or words)")
    if cost_unit not in COST_UNITS:
        raise UserError(f"unknown cost unit {cost_unit!r} (expected texts, bytes or words)")
    if samples is not None and samples <= 0:
        raise UserError(f"--samples must be positive, got {samples}")
    if (data is None) == (datasets is None):
        raise UserError("give the evaluation text either as --data or as --datasets FILE, not both")
    encoders = {name: _load_encoder(name, spec) for name, spec in config.items()}
    if datasets is not None:
        meta = datasets if isinstance(datasets, dict) else load_datasets(datasets)
        groups = {key: load_texts(d["data_path"], samples) for key, d in meta.items()}
        for key in [k for k, t in groups.items() if not t]:
            progress.log(f"dataset {key}: no text, left out")
            del groups[key]
        if not groups:
            raise UserError(f"no text to evaluate on in any dataset of {datasets}")
    else:
        meta, groups = {}, {"all": load_texts(data, samples)}
        if not groups["all"]:
            raise UserError(f"no text to evaluate on in {data}")
    texts = [t for g in groups.values() for t in g]

    summary: dict[str, dict[str, float]] = {}
    per_text: dict[str, dict[str, list[float | None]]] = {}
    per_dataset: dict[str, dict[str, dict[str, float]]] = {key: {} for key in meta if key in groups}
    for name, (encode, vocab_size) in encoders.items():
        progress.log(f"evaluating {name} on {len(texts):,} texts")
        ids = [encode(t) for t in progress.bar(texts, desc=name, unit="doc")]
        summary[name], per_text[name] = _summarise(texts, ids, vocab_size, unit, cost_unit)
        start = 0
        for key, g in groups.items():
            if key in per_dataset:
                per_dataset[key][name] = _summarise(g, ids[start:start + len(g)], vocab_size, unit, cost_unit)[0]
            start += len(g)

    gini_result: dict[str, Any] = {}
    if len(per_dataset) >= 2:
        for name in summary:
            costs = {key: per_dataset[key][name]["cost"] for key in per_dataset
                     if not math.isnan(per_dataset[key][name]["cost"])}
            g = gini(list(costs.values()))
            summary[name]["gini"] = g
            gini_result[name] = {"gini": g, "mean_cost": math.fsum(costs.values()) / len(costs), "costs": costs,
                                 "lorenz": lorenz_curve(costs)}

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

    better = GERTOKEVAL_HIGHER_IS_BETTER if gertokeval_bold else HIGHER_IS_BETTER
    tables = {"md": _markdown(summary, per_dataset, meta, unit, cost_unit, better),
              "tex": _latex(summary, unit, better), "csv": _csv(summary)}
    result = {"summary": summary, "per_text": stats, "pairwise": pairwise, "unit": unit, "cost_unit": cost_unit,
              "samples": len(texts), "datasets": {k: {**meta[k], "texts": len(groups[k]), "summary": v}
                                                  for k, v in per_dataset.items()},
              "gini": gini_result, "higher_is_better": better, "tables": tables, "files": []}
    if out is not None:
        result["files"] = _write(Path(out), result)
    return result


def _best(rows: dict[str, dict[str, float]], metric: str, better: dict[str, bool]) -> float:
    vals = [s[metric] for s in rows.values() if metric in s and not math.isnan(s[metric])]
    if not vals:
        return float("nan")
    return max(vals) if better[metric] else min(vals)


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "nan"
    return f"{x:.4f}" if abs(x) >= 0.01 or x == 0 else f"{x:.3e}"


def _label(m: str, unit: str) -> str:
    return LABELS[m] + (f" (tok/{unit[:-1]})" if m == "fertility" else "")


def _md_table(rows: dict[str, dict[str, float]], metrics: list[str], unit: str, better: dict[str, bool],
              vocab: bool = True) -> list[str]:
    head = "| Tokenizer | " + ("Vocab | " if vocab else "") + " | ".join(_label(m, unit) for m in metrics) + " |"
    lines = [head, "|---|" + ("---:|" if vocab else "") + "---:|" * len(metrics)]
    for name, s in rows.items():
        cells = [f"**{_fmt(s[m])}**" if s[m] == _best(rows, m, better) else _fmt(s[m]) for m in metrics]
        lines.append(f"| {name} | " + (f"{s['vocab_size']:,} | " if vocab else "") + " | ".join(cells) + " |")
    return lines


def legend(better: dict[str, bool], metrics: Sequence[str]) -> str:
    """The line under every table saying which direction was bolded."""
    hi = [LABELS[m] for m in metrics if better[m]]
    lo = [LABELS[m] for m in metrics if not better[m]]
    note = ("tokens/line bolded highest, as GerTokEval's tables do" if better["tokens_per_line"]
            else "GerTokEval's tables bold the highest tokens/line; --gertokeval-bold does the same")
    return f"Bold: best per column; higher is better for {', '.join(hi)}; lower for {', '.join(lo)} ({note})."


def _markdown(summary: dict[str, dict[str, float]], per_dataset: dict[str, dict[str, dict[str, float]]],
              meta: dict[str, Any], unit: str, cost_unit: str, better: dict[str, bool]) -> str:
    lines = _md_table(summary, METRICS, unit, better)
    info = INFO_METRICS + (["gini"] if all("gini" in s for s in summary.values()) and per_dataset else [])
    lines += ["", *_md_table(summary, info, unit, better, vocab=False)]
    lines += ["", legend(better, METRICS + info)]
    if per_dataset:
        lines.append(f"Fairness Gini and compression ratio use cost unit: {cost_unit} "
                     "(cost of a dataset = Σ tokens / Σ units).")
        for key, rows in per_dataset.items():
            lines += ["", f"#### {meta[key]['name']} ({key})", "",
                      *_md_table(rows, METRICS + INFO_METRICS, unit, better)]
    return "\n".join(lines) + "\n"


def _latex(summary: dict[str, dict[str, float]], unit: str, better: dict[str, bool]) -> str:
    def esc(s: str) -> str:
        return "".join("\\" + c if c in "&%$#_{}" else c for c in s)

    lines = [r"\begin{tabular}{l r " + "r " * len(METRICS) + "}", r"\toprule",
             "Tokenizer & Vocab & " + " & ".join(esc(_label(m, unit)) for m in METRICS) + r" \\", r"\midrule"]
    for name, s in summary.items():
        cells = [rf"\textbf{{{_fmt(s[m])}}}" if s[m] == _best(summary, m, better) else _fmt(s[m]) for m in METRICS]
        lines.append(f"{esc(name)} & {s['vocab_size']} & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", "% " + legend(better, METRICS)]
    return "\n".join(lines) + "\n"


def _csv(summary: dict[str, dict[str, float]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = METRICS + INFO_METRICS + (["gini"] if all("gini" in s for s in summary.values()) else [])
    w.writerow(["tokenizer", "vocab_size", *cols])
    for name, s in summary.items():
        w.writerow([name, s["vocab_size"], *(repr(s[m]) for m in cols)])
    return buf.getvalue()


def _save(fig: Any, path: Path, files: list[str]) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    files.append(str(path))


def _direction(better: dict[str, bool], m: str) -> str:
    return " (higher is better)" if better[m] else " (lower is better)"


def _write(out: Path, result: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    for ext, text in result["tables"].items():
        atomic_write_text(out / f"results.{ext}", text)
        files.append(str(out / f"results.{ext}"))
    payload = {k: v for k, v in result.items() if k not in ("tables", "files")}
    atomic_write_json(out / "results.json", json.loads(json.dumps(payload, default=float)))
    files.append(str(out / "results.json"))
    names, better = list(result["summary"]), result["higher_is_better"]
    for m in METRICS + INFO_METRICS:
        fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 2), 3.5))
        vals = [result["summary"][n][m] for n in names]
        errs = [result["per_text"][n][m]["stderr"] if m in PER_TEXT else 0.0 for n in names]
        ax.bar(names, vals, yerr=errs, color="#4c72b0", capsize=3)
        ax.set_title(LABELS[m] + _direction(better, m))
        ax.tick_params(axis="x", rotation=20)
        _save(fig, out / f"{m}.png", files)
    per_dataset = result["datasets"]
    if per_dataset:  # GerTokEval's per-language plots: one group of bars per dataset
        keys = list(per_dataset)
        width = 0.8 / len(names)
        for m in METRICS + INFO_METRICS:
            fig, ax = plt.subplots(figsize=(max(5.0, 1.0 * len(keys) * max(1, len(names)) * 0.5 + 2), 3.8))
            for i, n in enumerate(names):
                ax.bar([k + i * width for k in range(len(keys))], [per_dataset[d]["summary"][n][m] for d in keys],
                       width=width, label=n)
            ax.set_xticks([k + width * (len(names) - 1) / 2 for k in range(len(keys))], keys, rotation=20)
            ax.set_title(LABELS[m] + " per dataset" + _direction(better, m))
            ax.legend(fontsize=7)
            _save(fig, out / f"per_dataset_{m}.png", files)
    if result["gini"]:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="equality")
        for n, g in result["gini"].items():
            ax.plot(g["lorenz"]["x"], g["lorenz"]["y"], marker="o", label=f"{n} (Gini {g['gini']:.3f})")
        ax.set_xlabel("share of datasets (cheapest first)")
        ax.set_ylabel("share of token cost")
        ax.set_title("Lorenz curve of token cost")
        ax.legend(fontsize=7)
        _save(fig, out / "lorenz_curve.png", files)
    return files
