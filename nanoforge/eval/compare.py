"""`nanoforge eval compare`: the overview table of several models' task results (ours or lm-eval's JSON):
models as rows, task metrics as columns, an Avg column, the best value per column in bold, optional
± standard errors, and a † on values within one standard error of the column's best.

    print(compare_results(["runs/a/eval.json", "lm_eval_out/results_x.json"], fmt="md", stderr=True))
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any

from nanoforge.errors import UserError
from nanoforge.home import read_json

FORMATS = ("md", "tex", "csv")
# lm-eval puts bookkeeping numbers beside the metrics; these are not scores
NOT_METRICS = {"sample_len", "sample_count", "samples", "effective", "original", "num_fewshot"}
# losses and perplexities: smaller is better, shown as they are (not as percent), left out of Avg
LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "bpb", "val_bpb", "loss",
                   "ter"}


def lower_is_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER or "perplexity" in metric


def _load(item: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(item, dict):
        data, name = item, None
    else:
        path = Path(item)
        if path.is_dir():  # lm-eval --output_path writes <dir>/<model>/results_<time>.json
            found = sorted(path.rglob("results*.json"))
            if not found:
                raise UserError(f"{path}: no results*.json inside")
            path = found[-1]
        data, name = read_json(path, "results file"), path.stem
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise UserError(f"{item if not isinstance(item, dict) else 'results'}: not a results JSON "
                        f"(no 'results' mapping; expected `nanoforge eval tasks --out` or lm-eval output)")
    cfg = data.get("config") or {}
    args = cfg.get("model_args")
    if isinstance(args, dict):
        args = ",".join(f"{k}={v}" for k, v in args.items())
    label = data.get("name") or (str(args).split("=", 1)[-1].split(",")[0] if args else None) or name or "model"
    return str(label), data["results"]


def collect(items: list[Any], metrics: list[str] | None = None) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """(row names, column names 'task metric', rows {column: (value, stderr)})."""
    names, rows, columns = [], [], []
    for item in items:
        label, results = _load(item)
        row: dict[str, tuple[float, float]] = {}
        for task, vals in results.items():
            for key, v in vals.items():
                if not isinstance(v, (int, float)) or "_stderr" in key or isinstance(v, bool):
                    continue
                metric, _, filt = key.partition(",")
                if metric in NOT_METRICS or (not filt and f"{metric},none" in vals):
                    continue  # bookkeeping, or an old-style alias of the same value
                if metrics and metric not in metrics:
                    continue
                col = f"{task} {metric}" + (f" ({filt})" if filt and filt != "none" else "")
                se = vals.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
                se = float(se) if isinstance(se, (int, float)) else float("nan")
                row[col] = (float(v), se)
                if col not in columns:
                    columns.append(col)
        names.append(label)
        rows.append(row)
    if not columns:
        raise UserError("no metrics found in the given results" + (f" (asked for {metrics})" if metrics else ""))
    return names, columns, rows


def compare_results(items: list[str | os.PathLike | dict[str, Any]], *, fmt: str = "md", stderr: bool = False,
                    metrics: list[str] | None = None, names: list[str] | None = None, scale: float = 100.0) -> str:
    """The table as markdown, LaTeX or CSV. Scores are multiplied by `scale` (percent by default); losses and
    perplexities (lower is better: best is the smallest) are shown unscaled. Avg is the mean over the
    higher-is-better columns, for rows that have all of them (blank otherwise)."""
    if fmt not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    labels, columns, rows = collect(list(items), metrics)
    if names:
        if len(names) != len(labels):
            raise UserError(f"--names gives {len(names)} names for {len(labels)} results")
        labels = list(names)
    lower = {c: lower_is_better(c.split(" ")[1]) for c in columns}
    lower["Avg"] = False
    scored = [c for c in columns if not lower[c]]
    for row in rows:
        vals = [row[c][0] for c in scored if c in row]
        row["Avg"] = (sum(vals) / len(vals), float("nan")) if scored and len(vals) == len(scored) else None
    cols = columns + ["Avg"]
    sc = {c: 1.0 if lower[c] else scale for c in cols}
    pick = {c: min if lower[c] else max for c in cols}
    best = {c: pick[c]((r[c][0] for r in rows if r.get(c)), default=None) for c in cols}
    best_se = {c: next((r[c][1] for r in rows if r.get(c) and r[c][0] == best[c]), float("nan")) for c in cols}

    def cell(row: dict[str, Any], c: str, bold: tuple[str, str]) -> str:
        v = row.get(c)
        if not v:
            return ""
        text = f"{v[0] * sc[c]:.2f}"
        if stderr and not math.isnan(v[1]):
            text += (" ± " if fmt != "tex" else " $\\pm$ ") + f"{v[1] * sc[c]:.2f}"
        if fmt == "csv":
            return text
        if v[0] == best[c] and len(rows) > 1:
            text = f"{bold[0]}{text}{bold[1]}"
        elif not math.isnan(best_se[c]) and abs(best[c] - v[0]) <= max(best_se[c], 0 if math.isnan(v[1]) else v[1]):
            text += "†" if fmt == "md" else "$^\\dagger$"
        return text

    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["model", *cols] + ([f"{c} stderr" for c in columns] if stderr else []))
        for label, row in zip(labels, rows):
            w.writerow([label] + [f"{row[c][0] * sc[c]:.4f}" if row.get(c) else "" for c in cols]
                       + ([f"{row[c][1] * sc[c]:.4f}" if row.get(c) else "" for c in columns] if stderr else []))
        return buf.getvalue()
    if fmt == "md":
        lines = ["| Model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for label, row in zip(labels, rows):
            lines.append(f"| {label} | " + " | ".join(cell(row, c, ("**", "**")) for c in cols) + " |")
        lines.append("")
        lines.append("Best per column in bold; † = within one standard error of the best.")
        return "\n".join(lines) + "\n"

    def esc(text: str) -> str:
        return text.replace("_", "\\_").replace("%", "\\%").replace("&", "\\&")

    lines = ["\\begin{tabular}{l" + "r" * len(cols) + "}", "\\toprule",
             "Model & " + " & ".join(esc(c) for c in cols) + " \\\\", "\\midrule"]
    for label, row in zip(labels, rows):
        lines.append(esc(label) + " & " + " & ".join(cell(row, c, ("\\textbf{", "}")) for c in cols) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"
