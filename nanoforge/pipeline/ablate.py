"""`nanoforge ablate GRID.toml`: a grid of speedruns and one comparison table.

    [base]
    preset = "cpu-demo"
    data = "../shared/corpus/de"          # optional; default: the stdlib-docstring corpus
    set = ["train.max_steps=100"]         # overrides for every cell

    [axes]
    "tokenizer.backend" = ["rustbpe", "neox"]
    "train.lr" = [6e-4, 4e-4]
    "rl.group_size" = [4, 8]              # chat-stage keys (sft.*, rl.*) are axes like any other

Every cell (the product of the axes, in file order) is a speedrun named `<grid>--<cell>`; stages that cells
share (same corpus, same tokenizer settings) are made once, because stage outputs are keyed by the
fingerprint of only the config they depend on. Finished cells are skipped when the grid is run again.
Outputs in runs/<grid>/: comparison.md/.csv/.json (cells as rows: axis values, tokenizer metrics, val bpb,
task scores, Avg; best in bold; a `~` marks a value within one standard error of the best) and val_bpb.png
(every cell's validation curve).
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Any

from nanoforge import home, progress
from nanoforge.config import load_config
from nanoforge.errors import UserError
from nanoforge.pipeline.report import _finite, plot_colors, read_metrics
from nanoforge.pipeline.speedrun import speedrun
from nanoforge.pipeline.stages import StageRunner

# tokenizer metrics shown in the comparison: summary key -> (column, higher is better)
TOKENIZER_COLUMNS = {"fertility": ("fertility", False), "bytes_per_token": ("bytes/token", True),
                     "vocab_utilization": ("vocab util.", True)}


def load_grid(path: str | os.PathLike) -> tuple[dict[str, Any], list[tuple[str, list[Any]]]]:
    """(base, axes) from a grid TOML; axes as [(dotted key, values)] in file order. Refuses an empty or
    malformed grid and unknown keys (checked by building every cell's config)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"grid file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"grid file {path} is not valid TOML: {e}") from None
    unknown = set(data) - {"base", "axes"}
    if unknown:
        raise UserError(f"grid {path}: unknown section(s) {', '.join(sorted(unknown))}; expected [base] and [axes]")
    base = data.get("base", {})
    axes = list(_flatten(data.get("axes", {})).items())
    if not axes:
        raise UserError(f"grid {path}: no [axes]; add e.g. \"train.lr\" = [6e-4, 4e-4]")
    for key, values in axes:
        if not isinstance(values, list) or not values:
            raise UserError(f"grid {path}: axis {key} must be a non-empty list of values")
    extra = set(base) - {"preset", "data", "set", "config"}
    if extra:
        raise UserError(f"grid {path}: unknown [base] key(s) {', '.join(sorted(extra))}; "
                        f"valid: preset, data, set, config")
    overrides = base.get("set", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        example = f"set = [{overrides!r}]" if isinstance(overrides, str) else 'set = ["train.max_steps=100"]'
        raise UserError(f"grid {path}: [base] set must be a list of \"section.key=value\" strings ({example})")
    for key in ("preset", "data", "config"):
        if key in base and not isinstance(base[key], str):
            raise UserError(f"grid {path}: [base] {key} must be a string, got {base[key]!r}")
    return base, axes


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def cells(axes: list[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


def cell_name(cell: dict[str, Any]) -> str:
    parts = [f"{k.split('.')[-1]}={v}" for k, v in cell.items()]
    return re.sub(r"[^A-Za-z0-9=._+-]", "_", "_".join(parts))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def ablate(grid: str | os.PathLike, *, name: str | None = None, data: str | None = None, fresh: bool = False,
           overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Run every cell of `grid` (skipping finished ones), then write the comparison. Returns dict with
    `cells` (name, values, summary), `table` (path of comparison.md), `table_md`, `plot`."""
    base, axes = load_grid(grid)
    name = name or Path(grid).stem
    preset = base.get("preset", "cpu-demo")
    data = data if data is not None else base.get("data")
    if data and not str(data).startswith("hf:") and not os.path.isabs(str(data)):
        # relative data paths in a grid file are relative to the file
        candidate = (Path(grid).parent / str(data)).resolve()
        data = str(candidate) if candidate.exists() else str(data)
    base_set = list(base.get("set", [])) + list(overrides)
    grid_cells = cells(axes)
    plans = []
    for cell in grid_cells:
        cell_set = base_set + [f"{k}={_toml_value(v)}" for k, v in cell.items()]
        load_config(preset=preset, path=base.get("config"), overrides=cell_set)  # fail early on a bad cell
        plans.append((cell, cell_set))
    out_dir = home.run_dir(name)
    with home.lock(out_dir, "grid folder"):
        return _ablate(out_dir, name, preset, data, base, axes, plans, fresh)


def _ablate(out_dir: Path, name: str, preset: str, data: str | None, base: dict[str, Any], axes: list[Any],
            plans: list[tuple[dict[str, Any], list[str]]], fresh: bool) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / "cells.json"
    state = home.read_json(state_path, "grid state") if state_path.is_file() and not fresh else {}
    done_now: set[str] = set()
    results = []
    for i, (cell, cell_set) in enumerate(plans, 1):
        cname = cell_name(cell)
        run = f"{name}--{cname}"
        fp = home.fingerprint({"preset": preset, "data": data, "set": cell_set, "config": base.get("config")})
        prev = state.get(cname)
        if prev and prev.get("fingerprint") == fp and Path(prev["summary"]["report"]).is_file():
            progress.log(f"cell {i}/{len(plans)} {cname}: finished earlier, skipped")
            summary = prev["summary"]
        else:
            progress.log(f"cell {i}/{len(plans)} {cname}")
            runner = StageRunner(run, fresh=fresh, done_now=done_now)
            summary = speedrun(preset, data=data, run=run, fresh=fresh, overrides=cell_set,
                               config=base.get("config"), runner=runner)
            state[cname] = {"fingerprint": fp, "values": cell, "summary": summary}
            home.atomic_write_json(state_path, state)
        results.append({"name": cname, "run": run, "values": cell, "summary": summary})
    table = comparison_table(results, [k for k, _ in axes])
    home.atomic_write_text(out_dir / "comparison.md", table["md"] + "\n")
    home.atomic_write_text(out_dir / "comparison.csv", table["csv"])
    home.atomic_write_json(out_dir / "comparison.json", {"columns": table["columns"], "rows": table["rows"]})
    plot = plot_cells(results, out_dir / "val_bpb.png")
    progress.log(f"comparison: {out_dir / 'comparison.md'}, plot: {plot}")
    return {"grid": name, "cells": results, "table": str(out_dir / "comparison.md"), "table_md": table["md"],
            "plot": str(plot)}


def comparison_table(results: list[dict[str, Any]], axis_keys: list[str]) -> dict[str, Any]:
    """Cells as rows; per metric column the best value in bold, and `~` after values within one standard
    error of the best (tasks carry their stderr; val bpb and tokenizer metrics are exact)."""
    metric_cols: dict[str, bool] = {}  # name -> higher is better
    rows = []
    for res in results:
        s = res["summary"]
        values: dict[str, float] = {}
        errs: dict[str, float] = {}
        tok = dict(s.get("tokenizer_metrics") or {})
        if "bytes_per_token" not in tok and _finite(s.get("bytes_per_token")):
            tok["bytes_per_token"] = s["bytes_per_token"]  # from the token shards when there is no tokenizer eval
        for key, (col, higher) in TOKENIZER_COLUMNS.items():
            if _finite(tok.get(key)):
                values[col] = float(tok[key])
                metric_cols.setdefault(col, higher)
        if _finite(s.get("val_bpb")):
            values["val bpb"] = float(s["val_bpb"])
            metric_cols.setdefault("val bpb", False)
        for k, v in (s.get("tasks") or {}).items():
            values[k] = float(v)
            metric_cols.setdefault(k, True)
            if _finite((s.get("tasks_stderr") or {}).get(k)):
                errs[k] = float(s["tasks_stderr"][k])
        if s.get("tasks"):
            values["Avg"] = sum(s["tasks"].values()) / len(s["tasks"])
            metric_cols.setdefault("Avg", True)
        chat = s.get("chat_eval") or {}
        final = next((m for m in ("rl", "sft") if m in chat), None)
        for k, v in (chat.get(final) or {}).items():  # the chat model the cell ends with
            if _finite(v):
                values[f"chat {k}"] = float(v)
                metric_cols.setdefault(f"chat {k}", True)
        if _finite(s.get("rl_pass1_after")):
            values["RL pass@1"] = float(s["rl_pass1_after"])
            metric_cols.setdefault("RL pass@1", True)
            if _finite(s.get("rl_pass1_stderr_after")):
                errs["RL pass@1"] = float(s["rl_pass1_stderr_after"])
        rows.append({"cell": res["name"], "values": {k: res["values"][k] for k in axis_keys}, "metrics": values,
                     "stderr": errs})
    # tasks and Avg at the end, as in the German nano overview
    order = [c for c in metric_cols if c != "Avg"] + (["Avg"] if "Avg" in metric_cols else [])
    best = {}
    for col in order:
        vals = [r["metrics"][col] for r in rows if col in r["metrics"]]
        if vals:
            best[col] = max(vals) if metric_cols[col] else min(vals)
    header = [k.split(".")[-1] for k in axis_keys] + order
    md = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    csv = [",".join(header)]
    for r in rows:
        cells_md, cells_csv = [str(r["values"][k]) for k in axis_keys], [str(r["values"][k]) for k in axis_keys]
        for col in order:
            v = r["metrics"].get(col)
            if v is None:
                cells_md.append("–")
                cells_csv.append("")
                continue
            text = f"{v:.4f}"
            best_row = next((x for x in rows if x["metrics"].get(col) == best[col]), None)
            err = max(r["stderr"].get(col, 0.0), (best_row or {}).get("stderr", {}).get(col, 0.0))
            if v == best[col]:
                text = f"**{text}**"
            elif err > 0 and abs(v - best[col]) <= err:
                text += " ~"
            cells_md.append(text)
            cells_csv.append(f"{v:.6g}")
        md.append("| " + " | ".join(cells_md) + " |")
        csv.append(",".join(cells_csv))
    note = ("\n\nBest per column in **bold** (val bpb: lower is better); `~`: within one standard error of the "
            "best.")
    return {"md": "\n".join(md) + note, "csv": "\n".join(csv) + "\n", "columns": header, "rows": rows}


def plot_cells(results: list[dict[str, Any]], path: Path) -> Path:
    """One figure with every cell's validation-bpb curve (from its metrics.jsonl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for res, color in zip(results, plot_colors(len(results))):
        metrics_path = (res["summary"].get("metrics") or
                        str(home.run_dir(res["run"]) / "metrics.jsonl"))
        pts = [(m["step"], m["val_bpb"]) for m in read_metrics(metrics_path) if _finite(m.get("val_bpb"))]
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3, label=res["name"], color=color)
    ax.set_xlabel("step")
    ax.set_ylabel("validation bits per byte")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    with home.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path

