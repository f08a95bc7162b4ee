"""The speedrun report: runs/<run>/report.md, the same as one self-contained report.html (PNGs inlined),
plots/*.png (training loss, validation bpb) and summary.json (headline numbers, all finite).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import platform
import re
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

from nanoforge import __version__, home


def write_report(runner: Any, cfg: Any, data: str | None) -> dict[str, Any]:
    """Write report.md, report.html, plots/ and summary.json for the stages in `runner.results`. The page
    opens with the headline numbers, the commands to try the model and the curves; details follow and
    the environment and configuration are folded away (<details>)."""
    run_dir: Path = runner.run_dir
    r = {name: res.result for name, res in runner.results.items()}
    train, ev = r["pretrain"], r["eval"]
    metrics = read_metrics(train["metrics"])
    plots = plot_curves(metrics, run_dir / "plots")
    chat = chat_report(r, run_dir / "plots")
    mc = cfg.model_config()
    mc.vocab_size = int(r["tokenizer"].get("vocab_size") or mc.vocab_size)
    params = mc.num_params()
    flops_per_token = mc.flops_per_token(cfg.train.seq_len)
    steps = int(train.get("step") or 0)
    tokens_trained = steps * cfg.train.total_batch_tokens
    tps = [m["tokens_per_second"] for m in metrics if _finite(m.get("tokens_per_second"))]
    mfus = [m["mfu"] for m in metrics if _finite(m.get("mfu"))]
    tasks = ev.get("tasks") or {}
    task_scores = _task_scores(tasks)
    stage_rows = [(n, res.seconds, res.skipped) for n, res in runner.results.items()]
    total = time.perf_counter() - runner.started
    prompt = cfg.eval.prompts[0] if cfg.eval.prompts else "Once upon a time"
    try_cmd = f"nanoforge sample {train.get('checkpoint_dir')} --prompt {shlex.quote(prompt)}"
    try_cmds = chat["try"] or [try_cmd]

    summary = {
        "run": runner.run, "preset": cfg.preset, "data": data or "stdlib docstrings",
        "val_bpb": ev.get("val_bpb"), "final_loss": train.get("loss"), "train_val_bpb": train.get("val_bpb"),
        "steps": steps, "tokens_trained": tokens_trained, "params": params,
        "flops_per_token": flops_per_token, "train_flops": flops_per_token * tokens_trained,
        "tokens_per_second": (sum(tps) / len(tps)) if tps else train.get("tokens_per_second"),
        "mfu": (sum(mfus) / len(mfus)) if mfus else train.get("mfu"),
        "tokenizer_vocab_size": r["tokenizer"].get("vocab_size"),
        "bytes_per_token": (r["tokenize"].get("meta") or {}).get("bytes_per_token"),
        "tokenizer_metrics": tokenizer_metrics(r), "metrics": train.get("metrics"),
        "tasks": task_scores, "tasks_stderr": _task_scores(tasks, stderr=True), "tasks_avg": (sum(task_scores.values()) / len(task_scores)) if task_scores else None,
        "stage_seconds": {n: round(s, 3) for n, s, _ in stage_rows}, "total_seconds": round(total, 3),
        "checkpoint": train.get("checkpoint_dir"), "export": r.get("export", {}).get("export"),
        "report": str(run_dir / "report.md"), "try": try_cmds[0], "try_commands": try_cmds,
        **chat["summary"],
    }
    summary = _finite_only(summary)

    md = [f"# nanoforge speedrun: {runner.run}", "",
          f"Preset `{cfg.preset or '-'}`, data `{data or 'Python standard-library docstrings (offline default)'}`, "
          f"finished {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
          "## Headline", "", _table(["metric", "value"], [
              ["val bpb (full validation split)", _num(ev.get("val_bpb"))],
              ["final training loss", _num(train.get("loss"))], *chat["headline"],
              ["parameters", f"{params:,}"], ["steps", f"{steps:,}"], ["tokens trained", f"{tokens_trained:,}"],
              ["total time", _dur(total)]]), "",
          "## Try it", "", "```", *try_cmds, "```", "",
          "## Curves", ""]
    for name, png in {**plots, **chat["plots"]}.items():
        md += [f"![{name}](plots/{png.name})", ""]
    md += ["## Evaluation", "", _table(["metric", "value"],
                                       [["val bpb", _num(ev.get("val_bpb"))]]
                                       + [[k, _num(v)] for k, v in task_scores.items()]
                                       + ([["Avg", _num(summary["tasks_avg"])]] if "tasks_avg" in summary else [])),
           "", "## Samples (greedy)", ""]
    for s in ev.get("samples", []):
        md += [f"- **{_md_escape(s['prompt'])}** → {_md_escape(s['completion'])}"]
    md += ["", *chat["md"],
           "## Training", "", _table(["", ""], [
               ["tokens/s (mean)", _num(summary.get("tokens_per_second"), 0)],
               ["MFU (mean)", f"{100 * summary['mfu']:.2f}%" if "mfu" in summary else "n/a"],
               ["checkpoint", f"`{train.get('checkpoint_dir')}`"]]), "",
           "## Tokenizer", "", tokenizer_section(r), "",
           "## Model", "", _table(["", ""], [
               ["parameters (all)", f"{params:,}"], ["parameters (without embeddings)", f"{mc.num_params(False):,}"],
               ["training FLOPs per token", f"{flops_per_token:,}"],
               ["training FLOPs (total)", f"{flops_per_token * tokens_trained:.3e}"]]), "",
           "## Time per stage", "", _table(["stage", "seconds", ""], [
               [n, f"{s:.1f}", "up to date: skipped (seconds when it was made)" if skipped else ""]
               for n, s, skipped in stage_rows]
               + [["total (this invocation)", f"{total:.1f}", ""]]), "",
           "## Disk used", "", _table(["what", "path", "size"], disk_rows(r, run_dir)), "",
           "<details><summary>Hardware, software and configuration</summary>", "",
           "## Hardware and software", "", _table(["", ""], [[k, v] for k, v in environment().items()]), "",
           "## Configuration", "", "```toml", cfg.to_toml().strip(), "```", "",
           "</details>", ""]
    text = "\n".join(md)
    home.atomic_write_text(run_dir / "report.md", text)
    home.atomic_write_text(run_dir / "report.html", markdown_to_html(text, run_dir, title=f"speedrun {runner.run}"))
    home.atomic_write_json(run_dir / "summary.json", summary)
    return {"report": str(run_dir / "report.md"), "html": str(run_dir / "report.html"), "summary": summary,
            "outputs": [str(run_dir / "report.md")]}


MODEL_NAMES = {"base": "base", "sft": "SFT", "rl": "RL"}


def chat_report(r: dict[str, Any], plots_dir: Path) -> dict[str, Any]:
    """The chat half of the report from the sft, rl and chat_eval stages (whichever ran): headline rows,
    curves (SFT loss, RL reward and pass@k), the chat evaluation side by side, sample conversations,
    the commands to try the model and the summary keys."""
    out: dict[str, Any] = {"headline": [], "plots": {}, "md": [], "try": [], "summary": {}}
    sft, rl, ce = r.get("sft"), r.get("rl"), r.get("chat_eval")
    if not (sft or rl or ce):
        return out
    summary = out["summary"]
    if sft:
        sft_metrics = read_metrics(sft.get("metrics", ""))
        out["plots"].update(plot_curves(sft_metrics, plots_dir, CHAT_CURVES["sft"]))
        summary["sft_steps"], summary["sft_loss"] = sft.get("step"), sft.get("loss")
        summary["sft_val_loss"], summary["base_chat_val_loss"] = sft.get("val_loss"), sft.get("base_val_loss")
        summary["sft_checkpoint"] = sft.get("checkpoint_dir")
        out["headline"].append(["SFT: final training loss", _num(sft.get("loss"))])
        if _finite(sft.get("val_loss")):
            before = f"{_num(sft['base_val_loss'])} → " if _finite(sft.get("base_val_loss")) else ""
            out["headline"].append(["held-out conversation loss, base → SFT", before + _num(sft.get("val_loss"))])
    if rl:
        rl_metrics = read_metrics(rl.get("metrics", ""))
        k = rl.get("k", 1)
        out["plots"].update(plot_curves(rl_metrics, plots_dir, CHAT_CURVES["rl"] + [
            (f"pass@{k}", f"RL: held-out pass@{k}", "rl_pass_k.png")] if k > 1 else CHAT_CURVES["rl"]))
        summary.update({"rl_steps": rl.get("step"), "rl_checkpoint": rl.get("checkpoint_dir"),
                        "rl_pass1_before": rl.get("pass@1_start"), "rl_pass1_after": rl.get("pass@1"),
                        "rl_pass1_stderr_before": rl.get("pass@1_stderr_start"),
                        "rl_pass1_stderr_after": rl.get("pass@1_stderr"),
                        "rl_pass1_gain": rl.get("pass@1_gain"), "rl_pass1_gain_stderr": rl.get("pass@1_gain_stderr"),
                        "rl_reward_curve": [m["reward_mean"] for m in rl_metrics if _finite(m.get("reward_mean"))]})
        out["headline"].append(["RL: held-out arithmetic pass@1, before → after",
                                f"{_pm(rl.get('pass@1_start'), rl.get('pass@1_stderr_start'))} → "
                                f"{_pm(rl.get('pass@1'), rl.get('pass@1_stderr'))}"])
        if _finite(rl.get("pass@1_gain")):
            out["headline"].append(["RL: pass@1 gain on the same problems (paired standard error)",
                                    _pm(rl["pass@1_gain"], rl.get("pass@1_gain_stderr"), signed=True)])
    out["md"] += ["## Chat", ""]
    if ce:
        models = [m for m in ("base", "sft", "rl") if m in (ce.get("models") or {})]
        scores = {m: ce["models"][m] for m in models}
        errs = ce.get("stderr") or {}
        tasks = sorted({t for m in models for t in scores[m]})
        rows = [[t] + [_pm(scores[m].get(t), (errs.get(m) or {}).get(t)) for m in models] for t in tasks]
        summary["chat_eval"] = scores
        out["md"] += ["Chat evaluation (held-out splits of the chat data; ± one standard error):", "",
                      _table(["task"] + [MODEL_NAMES[m] for m in models], rows), ""]
    if sft:
        out["md"] += [f"SFT: {sft.get('step')} steps from the base model, checkpoint `{sft.get('checkpoint_dir')}`.",
                      ""]
    if rl:
        out["md"] += [f"RL: {rl.get('step')} steps from the SFT model ({rl.get('group_size')} samples per prompt, "
                      f"reward = exact `#### n` answer), checkpoint `{rl.get('checkpoint_dir')}`; the last steps' "
                      f"mean reward {_num(rl.get('reward_mean'), 3)}, groups without signal "
                      f"{_num(rl.get('zero_variance_frac'), 2)}.", ""]
    samples = (ce or {}).get("samples") or []
    if samples:
        out["md"] += ["### Sample conversations (held-out prompts, greedy)", ""]
        for s in samples:
            who = MODEL_NAMES.get(s.get("model", ""), s.get("model", ""))
            for m in s.get("messages", []):
                out["md"].append(f"- **{m['role']}{f' ({who})' if m['role'] == 'assistant' else ''}:** "
                                 f"{_md_escape(_text(m.get('content')))}")
            out["md"].append("")
    final = (ce or {}).get("final_checkpoint") or (rl or {}).get("checkpoint_dir") or (sft or {}).get("checkpoint_dir")
    export = ((r.get("export") or {}).get("export"))
    if final:
        out["try"] = [f"nanoforge chat {final}", f"nanoforge serve {final}"]
    if export:
        out["md"] += [f"The Hugging Face export of the last model (with its chat template) is `{export}`.", ""]
    return out


CHAT_CURVES = {"sft": [("loss", "SFT: training loss", "sft_loss.png"),
                       ("val_loss", "SFT: held-out loss", "sft_val_loss.png")],
               "rl": [("reward_mean", "RL: mean reward per step", "rl_reward.png"),
                      ("pass@1", "RL: held-out pass@1", "rl_pass1.png")]}


def _pm(v: Any, err: Any, *, signed: bool = False) -> str:
    if not _finite(v):
        return "n/a"
    num = f"{v:+.3f}" if signed else f"{v:.3f}"
    return f"{num} ± {err:.3f}" if _finite(err) else num


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(f"[{p.get('type')}: {p.get('text')}]" if p.get("type") in ("python", "python_output")
                       else str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


# --- pieces --------------------------------------------------------------------------------------------
def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    rows = []
    p = Path(path)
    if p.is_file():
        for line in p.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


PRETRAIN_CURVES = [("loss", "training loss", "loss.png"), ("val_bpb", "validation bits per byte", "val_bpb.png")]


def plot_curves(metrics: list[dict[str, Any]], out: Path,
                curves: list[tuple[str, str, str]] | None = None) -> dict[str, Path]:
    """One PNG per (metrics key, title, file name) of `curves` (default: training loss and validation bpb)
    that has finite values; returns {title: path} of those written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for key, title, fname in curves or PRETRAIN_CURVES:
        pts = [(m["step"], m[key]) for m in metrics if _finite(m.get(key))]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / fname)
        plt.close(fig)
        written[title] = out / fname
    return written


def tokenizer_section(r: dict[str, Any]) -> str:
    tok = r["tokenizer"]
    te = r.get("tokenizer_eval") or {}
    lines = [f"`{tok.get('name')}`: vocab {tok.get('vocab_size')}, fingerprint `{tok.get('fingerprint')}`, "
             f"saved in `{tok.get('path')}` (Hugging Face export in `hf/`)."]
    out = Path(te["out"]) if te.get("out") else None
    table = None
    if out and out.is_dir():
        for f in sorted(out.glob("*.md")):
            table = f.read_text(encoding="utf-8").strip()
            break
    if table:
        lines += ["", f"Metrics on the corpus's last {te.get('documents')} documents (unseen by the tokenizer "
                      f"when the corpus is longer than `tokenizer.max_chars`):", "", table]
    meta = r.get("tokenize", {}).get("meta") or {}
    if meta.get("chars_per_token"):
        lines += ["", f"On the whole corpus: {meta.get('tokens'):,} tokens, {meta['chars_per_token']} characters "
                      f"and {meta.get('bytes_per_token')} bytes per token."]
    return "\n".join(lines)


def environment() -> dict[str, str]:
    import torch

    from nanoforge.model import gemm

    env = {"CPU": gemm.cpu_name(), "CPU cores": str(os.cpu_count())}
    try:
        import psutil

        env["memory"] = f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
    except ImportError:
        pass
    if torch.cuda.is_available():
        env["GPU"] = f"{torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}"
    else:
        env["GPU"] = "none"
        env["CPU fp32 GEMM"] = "oneDNN" if gemm.use_onednn() else "torch default (MKL/OpenBLAS)"
    env.update({"OS": platform.platform(), "Python": platform.python_version(), "torch": torch.__version__,
                "nanoforge": __version__, "git commit": git_commit() or "not a git checkout"})
    return env


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + (" (modified)" if dirty.stdout.strip() else "")


def disk_rows(r: dict[str, Any], run_dir: Path) -> list[list[str]]:
    items = [("corpus", r["data"]["corpus"]), ("tokenizer", r["tokenizer"]["path"]),
             ("token shards", r["tokenize"]["tokens"]), ("checkpoints", r["pretrain"].get("checkpoint_dir")),
             *[(f"{MODEL_NAMES[k]} checkpoints", r[k].get("checkpoint_dir")) for k in ("sft", "rl") if r.get(k)],
             ("Hugging Face export", (r.get("export") or {}).get("export")), ("run folder", str(run_dir))]
    rows = []
    total = 0
    for what, path in items:
        if not path:
            rows.append([what, "not made", ""])
            continue
        paths = path if isinstance(path, list) else [path]
        size = sum(du(p) for p in paths if p)
        total += size
        shown = paths[0] if len(paths) == 1 else f"{Path(paths[0]).parent} ({len(paths)} files)"
        rows.append([what, f"`{shown}`", _bytes(size)])
    rows.append(["total", "", _bytes(total)])
    return rows


def du(path: str | os.PathLike) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if not p.is_dir():
        return 0
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def plot_colors(n: int) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def tokenizer_metrics(r: dict[str, Any]) -> dict[str, float]:
    """GerTokEval's metrics of our tokenizer (fertility, vocab_utilization, ...) from the tokenizer_eval stage."""
    metrics = (r.get("tokenizer_eval") or {}).get("metrics") or {}
    return {k: float(v) for k, v in metrics.items() if _finite(v) and k not in ("vocab_size", "tokens", "texts")}


def _task_scores(tasks: dict[str, Any], stderr: bool = False) -> dict[str, float]:
    """{"task metric": main score} (or its standard error) from run_tasks' result, which has lm-eval's
    layout: results[task]["acc,none"], ["acc_stderr,none"], ... The main metric is the first of
    acc_norm, acc, exact_match, mc2 that the task reports."""
    scores = {}
    for name, res in ((tasks or {}).get("results") or {}).items():
        if not isinstance(res, dict):
            continue
        for metric in ("acc_norm", "acc", "exact_match", "mc2"):
            key = next((k for k in res if k.split(",")[0] == metric), None)
            if key is None:
                continue
            filt = key.split(",", 1)[1] if "," in key else ""
            v = res.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr") if stderr else res[key]
            if _finite(v):
                scores[f"{name} {metric}"] = float(v)
            break
    return scores


# --- formatting ----------------------------------------------------------------------------------------
def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _finite_only(obj: Any) -> Any:
    """Drop None and non-finite numbers, so every number in summary.json is finite."""
    if isinstance(obj, dict):
        return {k: _finite_only(v) for k, v in obj.items()
                if v is not None and not (isinstance(v, float) and not math.isfinite(v))}
    return obj


def _num(v: Any, digits: int = 4) -> str:
    return f"{v:,.{digits}f}" if _finite(v) else "n/a"


def _dur(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _md_escape(s: str) -> str:
    return s.replace("\n", "⏎").replace("|", "\\|").replace("*", "\\*").replace("_", "\\_")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_to_html(text: str, base: Path, title: str = "report") -> str:
    """The small markdown subset our reports use (headings, tables, lists, code blocks, images, bold,
    code spans, and our own `<details><summary>…</summary>` / `</details>` lines) as one HTML page; images
    are inlined as base64 so the file stands alone; the curves sit two per row."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append("<pre><code>" + html.escape("\n".join(lines[i + 1:j])) + "</code></pre>")
            i = j + 1
            continue
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(lines[i])
                i += 1
            out.append(_html_table(rows))
            continue
        if line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:], base)}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        if re.fullmatch(r"<details><summary>[^<>]*</summary>|</details>", line):
            out.append(line)  # the folded configuration block: passed through as is
            i += 1
            continue
        m = re.match(r"(#{1,6}) (.*)", line)
        if m:
            n = len(m.group(1))
            out.append(f"<h{n}>{_inline(m.group(2), base)}</h{n}>")
        elif line.strip():
            out.append(f"<p>{_inline(line, base)}</p>")
        i += 1
    style = ("body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;"
             "text-align:left}pre{background:#f6f6f6;padding:.8em;overflow:auto}img{max-width:100%}"
             "p:has(>img:only-child){display:inline-block;width:49%;margin:0}"
             "summary{cursor:pointer;font-weight:600;margin:1em 0}")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def _html_table(rows: list[str]) -> str:
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", r.strip().strip("|"))] for r in rows]
    body = [c for c in cells if not all(set(x) <= set("-: ") and x for x in c)]
    if not body:
        return ""
    head, rest = body[0], body[1:]
    h = "<tr>" + "".join(f"<th>{_inline(c, None)}</th>" for c in head) + "</tr>"
    b = "".join("<tr>" + "".join(f"<td>{_inline(c, None)}</td>" for c in r) + "</tr>" for r in rest)
    return f"<table>{h}{b}</table>"


def _inline(s: str, base: Path | None) -> str:
    def image(m: re.Match) -> str:
        alt, src = m.group(1), m.group(2)
        path = (base / src) if base is not None else Path(src)
        if path.is_file():
            data = base64.b64encode(path.read_bytes()).decode()
            return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
        return html.escape(alt)

    parts = re.split(r"(!\[[^\]]*\]\([^)]*\))", s)
    out = []
    for part in parts:
        m = re.fullmatch(r"!\[([^\]]*)\]\(([^)]*)\)", part)
        if m:
            out.append(image(m))
            continue
        t = html.escape(part.replace("\\|", "|").replace("\\*", "\x00").replace("\\_", "\x01"))
        t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
        t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
        out.append(t.replace("\x00", "*").replace("\x01", "_"))
    return "".join(out)
