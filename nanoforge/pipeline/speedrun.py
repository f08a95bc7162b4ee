"""`nanoforge speedrun`: text to an evaluated, exported model in one command, with a report.

    nanoforge speedrun --preset cpu-demo                         # the stdlib-docstring corpus, offline
    nanoforge speedrun --preset cpu-demo --data ../shared/corpus/de
    nanoforge speedrun --preset nano-125m --data hf:stefan-it/nanochat-german-data:0-7

Stages: data → tokenizer → tokenizer_eval → tokenize → pretrain → eval → export → report. Each is
skipped when its outputs exist for the same inputs (see stages.py), so an interrupted speedrun continues
where it stopped (pretraining resumes from its last checkpoint); `fresh=True` redoes everything.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from nanoforge import home, progress
from nanoforge.config import RunConfig, load_config
from nanoforge.errors import UserError
from nanoforge.pipeline.stages import Interrupted, StageRunner, log_to_file

STAGES = ("data", "tokenizer", "tokenizer_eval", "tokenize", "pretrain", "eval", "export", "report")
# The default corpus is English API documentation: prompts that read like it (the presets' prompts
# are German, for the German corpus); `--set eval.prompts=[...]` still wins.
STDLIB_PROMPTS = ["Return a new list of", "This module provides"]
TOKENIZER_EVAL_DOCS = 200  # documents (the corpus's last) the tokenizer table is computed on


def speedrun(preset: str | None = "cpu-demo", *, data: str | None = None, run: str | None = None,
             fresh: bool = False, overrides: list[str] | tuple[str, ...] = (), config: str | None = None,
             runner: StageRunner | None = None) -> dict[str, Any]:
    """Run every stage for `preset` (+ `config` file, + `section.key=value` overrides) on `data` (a folder
    or files, `hf:REPO[:SHARDS]`, or None for the stdlib corpus). Returns the summary dict (also written to
    runs/<run>/summary.json) with `report` pointing at runs/<run>/report.md.
    Raises Interrupted (exit 130) when pretraining was stopped by a signal; rerunning continues it."""
    cfg = load_config(preset=preset, path=config, overrides=list(overrides))
    if data is None and not any(o.split("=", 1)[0].strip() == "eval.prompts" for o in overrides):
        cfg.eval.prompts = list(STDLIB_PROMPTS)
    run = run or default_run_name(cfg, data)
    runner = runner or StageRunner(run, fresh=fresh, rank=int(os.environ.get("RANK", "0")))
    runner.total = len(STAGES)
    with log_to_file(runner.run_dir / "log.txt"):
        progress.log(f"speedrun {run}: preset {preset or '-'}, data {data or 'stdlib docstrings'}, "
                     f"outputs in {runner.run_dir}")
        home.atomic_write_text(runner.run_dir / "config.toml", cfg.to_toml())
        return _run_stages(runner, cfg, data)


def default_run_name(cfg: RunConfig, data: str | None) -> str:
    source = "stdlib" if data is None else Path(data.split(":")[1] if data.startswith("hf:") else data).name
    return home.slug(f"speedrun-{cfg.preset or 'custom'}-{source or 'data'}")


def _run_stages(runner: StageRunner, cfg: RunConfig, data: str | None) -> dict[str, Any]:
    sections = cfg.to_dict()
    run = runner.run

    data_res = runner.stage("data", _data_inputs(data), lambda fp: _stage_data(data, fp, runner.fresh))
    corpus = data_res.result["corpus"]

    tok_res = runner.stage("tokenizer", {"data": data_res.fingerprint, "tokenizer": sections["tokenizer"]},
                           lambda fp: _stage_tokenizer(cfg, corpus, fp))
    tokenizer_path = tok_res.result["path"]

    runner.stage("tokenizer_eval", {"tokenizer": tok_res.fingerprint, "data": data_res.fingerprint, "run": run},
                 lambda fp: _stage_tokenizer_eval(runner, cfg, corpus, tokenizer_path, tok_res.result["name"]))

    tokens_res = runner.stage("tokenize", {"tokenizer": tok_res.fingerprint, "data": data_res.fingerprint,
                                           "val_docs": cfg.data.val_docs},
                              lambda fp: _stage_tokenize(corpus, tokenizer_path, cfg, fp, runner.fresh))
    tokens = tokens_res.result["tokens"]

    train_inputs = {"tokens": tokens_res.fingerprint, "model": sections["model"], "train": sections["train"],
                    "layout": cfg.data.layout}
    # under torchrun every rank trains (DDP); the stages before it ran on rank 0, those after it do too
    train_res = runner.stage("pretrain", train_inputs,
                             lambda fp: _stage_pretrain(cfg, tokens, run, fp, runner.fresh), all_ranks=True)
    if runner.rank > 0:
        return {"rank": runner.rank, "checkpoint": train_res.result.get("checkpoint_dir")}

    runner.stage("eval", {"pretrain": train_res.fingerprint, "eval": sections["eval"], "run": run},
                 lambda fp: _stage_eval(runner, cfg, train_res.result, tokens, tokenizer_path))
    runner.stage("export", {"pretrain": train_res.fingerprint}, lambda fp: _stage_export(train_res.result, fp))

    from nanoforge.pipeline.report import write_report

    report_res = runner.stage("report", {}, lambda fp: write_report(runner, cfg, data), cache=False)
    summary = report_res.result["summary"]
    progress.log(f"val bpb {summary.get('val_bpb', float('nan')):.4f}; report: {report_res.result['report']} "
                 f"(and report.html)")
    progress.log(f"try the model: {summary['try']}")
    return summary


# --- data ------------------------------------------------------------------------------------------------
def _data_inputs(data: str | None) -> dict[str, Any]:
    if data is None:
        from nanoforge.pipeline.stdlib_corpus import VERSION

        return {"source": "stdlib", "python": sys.version.split()[0], "corpus_version": VERSION}
    if data.startswith("hf:"):
        repo, shards = _parse_hf(data)
        return {"source": "hf", "repo": repo, "shards": shards}
    from nanoforge.data.corpus import list_files

    files = list_files(data)
    return {"source": "files", "files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def _parse_hf(data: str) -> tuple[str, list[int]]:
    spec = data[3:]
    repo, _, shards = spec.partition(":")
    if repo.count("/") != 1:
        raise UserError(f"--data {data}: expected hf:OWNER/NAME[:SHARDS], e.g. hf:stefan-it/nanochat-german-data:0-7")
    from nanoforge.data.download import parse_shards

    return repo, parse_shards(shards or "0")


def _stage_data(data: str | None, fp: str, fresh: bool) -> dict[str, Any]:
    if data is None:
        from nanoforge.pipeline.stdlib_corpus import META, build_stdlib_corpus

        out = build_stdlib_corpus(force=fresh)
        return {"corpus": str(out), "outputs": [str(out / META)], "source": "stdlib docstrings"}
    if data.startswith("hf:"):
        from nanoforge.data.download import download_shards

        repo, shards = _parse_hf(data)
        out = home.corpus_dir(f"hf-{repo.replace('/', '--')}")
        paths = download_shards(repo, shards, out)
        return {"corpus": [str(p) for p in paths], "outputs": [str(p) for p in paths], "source": data}
    from nanoforge.data.corpus import list_files, parquet_file

    files = list_files(data)
    if all(f.suffix == ".parquet" for f in files):
        for f in files:
            parquet_file(f)  # checks the `text` column; standard shards are used in place
        return {"corpus": [str(f.resolve()) for f in files], "outputs": [str(f) for f in files],
                "source": str(Path(data).resolve())}
    from nanoforge.data.importer import import_documents

    out = import_documents([data], home.corpus_dir(f"import-{fp[:8]}"), force=True)
    return {"corpus": str(out), "outputs": [str(out)], "source": str(Path(data).resolve())}


# --- tokenizer --------------------------------------------------------------------------------------------
def _stage_tokenizer(cfg: RunConfig, corpus: Any, fp: str) -> dict[str, Any]:
    from nanoforge.tokenizer import Tokenizer
    from nanoforge.tokenizer.train import train_tokenizer

    t = cfg.tokenizer
    name = f"{t.backend}{t.vocab_size}-{fp[:8]}"
    path = train_tokenizer(corpus, vocab_size=t.vocab_size, backend=t.backend, name=name,
                           max_chars=t.max_chars or None, doc_cap=t.doc_cap or None, force=True)
    tok = Tokenizer.load(path)
    return {"path": str(path), "name": name, "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
            "outputs": [str(path), str(Path(path) / "hf")]}


def _held_out_documents(corpus: Any, n: int) -> list[str]:
    """The last `n` non-empty documents of the corpus: the tokenizer trains on the first
    `tokenizer.max_chars` characters, so these are unseen whenever the corpus is larger than that."""
    from nanoforge.data.corpus import iter_file, list_files

    docs: list[str] = []
    for path in reversed(list_files(corpus if isinstance(corpus, list) else [corpus])):
        docs = [t for t in iter_file(path) if t.strip()] + docs
        if len(docs) >= n:
            break
    return docs[-n:]


def _stage_tokenizer_eval(runner: StageRunner, cfg: RunConfig, corpus: Any, tokenizer_path: str,
                          name: str) -> dict[str, Any]:
    from nanoforge.tokenizer import metrics

    out = runner.run_dir / "tokenizer_eval"
    docs = _held_out_documents(corpus, TOKENIZER_EVAL_DOCS)
    if not docs:
        raise UserError("the corpus has no non-empty documents to evaluate the tokenizer on")
    held_out = runner.run_dir / "held_out.jsonl"
    import json

    home.atomic_write_text(held_out, "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    if out.exists():
        shutil.rmtree(out)
    result = metrics.evaluate_tokenizers({name: {"class": "nanoforge", "path": tokenizer_path}}, held_out, out=out)
    summary = (result.get("summary") or {}).get(name, {})
    return {"out": str(out), "documents": len(docs), "metrics": _jsonable(summary), "outputs": [str(out)]}


# --- tokens, pretraining ----------------------------------------------------------------------------------
def _stage_tokenize(corpus: Any, tokenizer_path: str, cfg: RunConfig, fp: str, fresh: bool) -> dict[str, Any]:
    from nanoforge.data.shards import read_meta
    from nanoforge.data.tokenize import tokenize_corpus

    corpus_arg = corpus if isinstance(corpus, list) else [corpus]
    out = tokenize_corpus(corpus_arg, tokenizer_path, name=f"speedrun-{fp[:8]}", val_docs=cfg.data.val_docs,
                          force=fresh)
    meta = read_meta(out)
    return {"tokens": str(out), "outputs": [str(Path(out) / "meta.json")],
            "meta": {k: meta.get(k) for k in ("tokens", "documents", "chars_per_token", "bytes_per_token",
                                              "vocab_size", "splits")}}


def _stage_pretrain(cfg: RunConfig, tokens: str, run: str, fp: str, fresh: bool) -> dict[str, Any]:
    from nanoforge import checkpoint as ckpt
    from nanoforge.train.loop import train

    tag = f"{run}-{fp[:8]}"
    folder = home.checkpoint_dir("base", tag)
    if fresh and folder.exists() and int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(folder)
    resume = bool(folder.exists() and ckpt.checkpoint_steps(folder))
    if resume:
        progress.log(f"resuming pretraining from {folder}")
    summary = train(RunConfig.from_dict(cfg.to_dict()), tokens=tokens, tag=tag, run=run, resume=resume,
                    own_run=True)
    if summary.get("interrupted"):
        raise Interrupted(f"pretraining stopped at step {summary['step']} (checkpoint saved in {folder}); "
                          f"run the same command again to continue")
    summary = _jsonable(summary)
    summary["tag"] = tag
    summary["outputs"] = [summary["checkpoint"], summary["metrics"]]
    return summary


# --- eval, export -----------------------------------------------------------------------------------------
def _stage_eval(runner: StageRunner, cfg: RunConfig, train: dict[str, Any], tokens: str,
                tokenizer_path: str) -> dict[str, Any]:
    import torch

    from nanoforge.checkpoint import load_model
    from nanoforge.eval.bpb import evaluate_bpb
    from nanoforge.tokenizer import Tokenizer

    out = runner.run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    tc = cfg.train
    device = tc.device if tc.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, _meta = load_model(train["checkpoint_dir"], device=device)
    model.eval()
    tok = Tokenizer.load(tokenizer_path)
    bpb = evaluate_bpb(model, tokens, tok.token_bytes, batch_size=tc.device_batch_size, seq_len=tc.seq_len,
                       device=device, layout=cfg.data.layout)
    result: dict[str, Any] = {"val_bpb": float(bpb["val_bpb"]), "bpb": _jsonable(bpb)}
    tasks = _run_demo_tasks(model, tok, cfg, device, out)
    result["tasks"] = tasks
    samples = []
    with torch.no_grad():
        for prompt in cfg.eval.prompts:
            samples.append({"prompt": prompt, "completion": _generate(model, tok, prompt, cfg.eval.max_new_tokens)})
    result["samples"] = samples
    home.atomic_write_json(out / "results.json", result)
    result["out"] = str(out)
    result["outputs"] = [str(out / "results.json")]
    return result


def _run_demo_tasks(model: Any, tok: Any, cfg: RunConfig, device: str, out: Path) -> dict[str, Any]:
    """eval.tasks, or else the bundled demo tasks, scored by nanoforge.eval's run_tasks."""
    from nanoforge.eval.tasks import run_tasks

    names = list(cfg.eval.tasks) or demo_tasks()
    if not names:
        progress.warn("no eval.tasks configured and no bundled demo tasks: skipping the task evaluation")
        return {}
    res = run_tasks(model, names, tokenizer=tok, device=device, limit=cfg.eval.limit or None,
                             out=out / "tasks.json")
    return _jsonable(res)


def demo_tasks() -> list[str]:
    """The bundled tasks marked as demo tasks (corpus-agnostic, tiny)."""
    from nanoforge.eval.taskspec import list_tasks

    return [t["task"] for t in list_tasks() if "demo" in t["task"]]


def _generate(model: Any, tok: Any, prompt: str, max_new_tokens: int) -> str:
    from nanoforge.infer.engine import generate

    return generate(model, tok, prompt, max_new_tokens=max_new_tokens, temperature=0.0)


def _stage_export(train: dict[str, Any], fp: str) -> dict[str, Any]:
    from nanoforge.export.hf import export_hf

    out = export_hf(train["checkpoint_dir"], home.export_dir(train["tag"]), force=True)
    return {"export": str(out), "outputs": [str(Path(out) / "config.json")]}


# --- helpers ----------------------------------------------------------------------------------------------
def _jsonable(obj: Any) -> Any:
    """A JSON-safe copy: paths to str, numpy/torch scalars to float, non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, bool)) or obj is None:
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, os.PathLike):
        return str(obj)
    try:
        value = float(obj)
    except (TypeError, ValueError):
        return str(obj)
    return value if math.isfinite(value) else None

