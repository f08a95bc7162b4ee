"""`nanoforge speedrun`: text to an evaluated, exported model in one command, with a report.

    nanoforge speedrun --preset cpu-demo                         # the stdlib-docstring corpus, offline
    nanoforge speedrun --preset cpu-demo --data ../shared/corpus/de
    nanoforge speedrun --preset nano-125m --data hf:stefan-it/nanochat-german-data:0-7

Stages: data → tokenizer → tokenizer_eval → tokenize → pretrain → eval → sft → rl → chat_eval → export
→ report. `until` ("base" | "sft" | "rl", default speedrun.until) stops the training earlier; the export
and the report are of the last model. SFT trains on the offline default chat data (speedrun.chat_data
names another), RL on its arithmetic problems (rl.data); the chat evaluation scores base, SFT and RL
models side by side on the held-out chat tasks. Each stage is skipped when its outputs exist for the same
inputs (see stages.py), so an interrupted speedrun continues where it stopped (training stages resume
from their last checkpoint); `fresh=True` redoes everything.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nanoforge import home, progress
from nanoforge.config import RunConfig, load_config
from nanoforge.errors import UserError
from nanoforge.pipeline.stages import Interrupted, StageRunner, log_to_file

BASE_STAGES = ("data", "tokenizer", "tokenizer_eval", "tokenize", "pretrain", "eval")
CHAT_STAGES = {"base": (), "sft": ("sft", "chat_eval"), "rl": ("sft", "rl", "chat_eval")}
STAGES = BASE_STAGES + ("export", "report")  # a speedrun --until base


def stages(until: str) -> tuple[str, ...]:
    """The stages a speedrun runs for `until` = base | sft | rl."""
    if until not in CHAT_STAGES:
        raise UserError(f"--until must be one of base, sft, rl; got {until!r}")
    return BASE_STAGES + CHAT_STAGES[until] + ("export", "report")
# The default corpus is English API documentation: prompts that read like it (the presets' prompts
# are German, for the German corpus); `--set eval.prompts=[...]` still wins.
STDLIB_PROMPTS = ["Return a new list of", "This module provides"]
TOKENIZER_EVAL_DOCS = 200  # documents (the corpus's last) the tokenizer table is computed on


def speedrun(preset: str | None = "cpu-demo", *, data: str | None = None, run: str | None = None,
             fresh: bool = False, overrides: list[str] | tuple[str, ...] = (), config: str | None = None,
             runner: StageRunner | None = None, until: str | None = None) -> dict[str, Any]:
    """Run every stage for `preset` (+ `config` file, + `section.key=value` overrides) on `data` (a folder
    or files, `hf:REPO[:SHARDS]`, or None for the stdlib corpus), training up to `until` (base | sft | rl;
    default speedrun.until). Returns the summary dict (also written to runs/<run>/summary.json) with
    `report` pointing at runs/<run>/report.md and `try_commands` (chat and serve the model).
    Raises Interrupted (exit 130) when a training stage was stopped by a signal; rerunning continues it."""
    cfg = load_config(preset=preset, path=config, overrides=list(overrides))
    if until is not None:
        stages(until)
        cfg.speedrun.until = until
    phase_sets = {name: phase_overrides(name, preset, config, overrides) for name in ("sft", "rl")}
    if data is None and not any(o.split("=", 1)[0].strip() == "eval.prompts" for o in overrides):
        cfg.eval.prompts = list(STDLIB_PROMPTS)
    run = run or default_run_name(cfg, data)
    runner = runner or StageRunner(run, fresh=fresh, rank=int(os.environ.get("RANK", "0")))
    runner.total = len(stages(cfg.speedrun.until))
    held = home.lock(runner.run_dir, "run folder") if runner.rank == 0 else contextlib.nullcontext()
    with held, log_to_file(runner.run_dir / "log.txt"):
        progress.log(f"speedrun {run}: preset {preset or '-'}, data {data or 'stdlib docstrings'}, "
                     f"until {cfg.speedrun.until}, outputs in {runner.run_dir}")
        home.atomic_write_text(runner.run_dir / "config.toml", cfg.to_toml())
        return _run_stages(runner, cfg, data, phase_sets)


def phase_overrides(section: str, preset: str | None, config: str | None, overrides: Sequence[str]) -> list[str]:
    """The `section.key=value` settings that the preset, the config file and the overrides give the [sft] or
    [rl] section, in that order: what the speedrun passes on to train sft / train rl (whose own phase
    defaults apply to everything else)."""
    from nanoforge.config import PRESETS_DIR, _read_toml

    out = []
    for path in ([PRESETS_DIR / f"{preset}.toml"] if preset else []) + ([Path(config)] if config else []):
        for key, value in (_read_toml(path).get(section) or {}).items():
            out.append(f"{section}.{key}={_toml_value(value)}")
    return out + [o for o in overrides if o.split("=", 1)[0].strip().startswith(f"{section}.")]


def _toml_value(v: Any) -> str:
    import tomli_w

    return tomli_w.dumps({"v": v}).split("=", 1)[1].strip()


def default_run_name(cfg: RunConfig, data: str | None) -> str:
    source = "stdlib" if data is None else Path(data.split(":")[1] if data.startswith("hf:") else data).name
    return home.slug(f"speedrun-{cfg.preset or 'custom'}-{source or 'data'}")


def _run_stages(runner: StageRunner, cfg: RunConfig, data: str | None, phase_sets: dict[str, list[str]]
                ) -> dict[str, Any]:
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

    eval_res = runner.stage("eval", {"pretrain": train_res.fingerprint, "eval": sections["eval"], "run": run},
                            lambda fp: _stage_eval(runner, cfg, train_res.result, tokens, tokenizer_path))
    del eval_res
    until = cfg.speedrun.until
    final = train_res
    models = {"base": train_res}
    if until in ("sft", "rl"):
        chat_data = cfg.speedrun.chat_data or None
        sft_res = runner.stage("sft", {"pretrain": train_res.fingerprint, "sft": phase_sets["sft"],
                                       "data": _chat_data_inputs(chat_data)},
                               lambda fp: _stage_sft(train_res.result, chat_data, phase_sets["sft"], run, fp,
                                                     runner.fresh))
        final = models["sft"] = sft_res
    if until == "rl":
        rl_res = runner.stage("rl", {"sft": sft_res.fingerprint, "rl": phase_sets["rl"],
                                     "data": _chat_data_inputs(cfg.rl.data or None)},
                              lambda fp: _stage_rl(sft_res.result, phase_sets["rl"], run, fp, runner.fresh))
        final = models["rl"] = rl_res
    if until in ("sft", "rl"):
        runner.stage("chat_eval", {"models": {k: v.fingerprint for k, v in models.items()},
                                   "eval": sections["eval"], "limit": cfg.speedrun.chat_eval_limit, "run": run},
                     lambda fp: _stage_chat_eval(runner, cfg, {k: v.result for k, v in models.items()}))
    runner.stage("export", {"pretrain": final.fingerprint} if final is train_res else {"model": final.fingerprint},
                 lambda fp: _stage_export(final.result, fp))

    from nanoforge.pipeline.report import write_report

    report_res = runner.stage("report", {}, lambda fp: write_report(runner, cfg, data), cache=False)
    summary = report_res.result["summary"]
    progress.log(f"val bpb {summary.get('val_bpb', float('nan')):.4f}; report: {report_res.result['report']} "
                 f"(and report.html)")
    if summary.get("export"):
        progress.log(f"Hugging Face export: {summary['export']}")
    progress.log("try the model:\n  " + "\n  ".join(summary.get("try_commands") or [summary["try"]]))
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


def _stage_export(model: dict[str, Any], fp: str) -> dict[str, Any]:
    """The Hugging Face export of the speedrun's last model (a chat model's carries its chat template)."""
    from nanoforge.export.hf import export_hf

    out = export_hf(model["checkpoint_dir"], home.export_dir(model["tag"]), force=True)
    return {"export": str(out), "outputs": [str(Path(out) / "config.json")], "checkpoint": model["checkpoint_dir"]}


# --- the chat half: sft, rl, chat_eval ------------------------------------------------------------------
def _chat_data_inputs(chat_data: str | None) -> dict[str, Any]:
    """What a chat-data source's fingerprint depends on: the default's version, or the files' sizes/times."""
    if chat_data is None:
        import nanoforge.data.chat as chat

        return {"source": "default", "version": getattr(chat, "DEFAULT_CHAT_VERSION", getattr(chat, "VERSION", 0)),
                "python": sys.version.split()[0]}
    p = Path(chat_data)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return {"source": "files", "files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns]
                                         for f in files if f.exists()]}


def _resume_flag(phase: str, tag: str, fresh: bool, what: str) -> bool:
    from nanoforge import checkpoint as ckpt

    folder = home.checkpoint_dir(phase, tag)
    if fresh and folder.exists() and int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(folder)
    resume = bool(folder.exists() and ckpt.checkpoint_steps(folder))
    if resume:
        progress.log(f"resuming {what} from {folder}")
    return resume


def _stage_sft(base: dict[str, Any], chat_data: str | None, sets: list[str], run: str, fp: str,
               fresh: bool) -> dict[str, Any]:
    from nanoforge.train.sft import train_sft

    if chat_data is None:
        from nanoforge.data.chat import default_chat_data

        chat_data = str(default_chat_data())
    tag = f"{run}-{fp[:8]}"
    resume = _resume_flag("sft", tag, fresh, "SFT")
    summary = train_sft(base["checkpoint_dir"], chat_data, tag=tag, overrides=sets, run=f"{run}--sft",
                        resume=resume)
    if summary.get("interrupted"):
        raise Interrupted(f"SFT stopped at step {summary['step']} (checkpoint saved in "
                          f"{home.checkpoint_dir('sft', tag)}); run the same command again to continue")
    summary = _jsonable(summary)
    summary.update(tag=tag, data=chat_data, outputs=[summary["checkpoint"], summary["metrics"]])
    return summary


def _stage_rl(sft: dict[str, Any], sets: list[str], run: str, fp: str, fresh: bool) -> dict[str, Any]:
    from nanoforge.train.rl import train_rl

    tag = f"{run}-{fp[:8]}"
    resume = _resume_flag("rl", tag, fresh, "RL")
    summary = train_rl(sft["checkpoint_dir"], None, tag=tag, overrides=sets, run=f"{run}--rl", resume=resume)
    if summary.get("interrupted"):
        raise Interrupted(f"RL stopped at step {summary['step']} (checkpoint saved in "
                          f"{home.checkpoint_dir('rl', tag)}); run the same command again to continue")
    summary = _jsonable(summary)
    summary.update(tag=tag, outputs=[summary["checkpoint"], summary["metrics"]])
    return summary


SAMPLE_CONVERSATIONS = 3
CHAT_TASKS = ("arithmetic_chat", "replies_chat")  # bundled, on the default chat data's held-out split


def _stage_chat_eval(runner: StageRunner, cfg: RunConfig, models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every model of the run (base, SFT, RL) on the bundled held-out chat tasks (greedy, tools on), and
    greedy replies of the last model to a few held-out prompts."""
    from nanoforge.eval.chat import eval_chat

    out = runner.run_dir / "chat_eval"
    out.mkdir(parents=True, exist_ok=True)
    scores, errs = {}, {}
    limit = cfg.speedrun.chat_eval_limit or None
    for name, res in models.items():
        progress.log(f"chat eval of the {name} model")
        result = eval_chat(res["checkpoint_dir"], list(CHAT_TASKS), limit=limit, out=out / f"{name}.json")
        scores[name], errs[name] = chat_scores(result)
    final = list(models)[-1]
    samples = [{"model": final, "messages": m} for m in _sample_conversations(models[final]["checkpoint_dir"],
                                                                               cfg.rl.max_new_tokens)]
    result = {"models": scores, "stderr": errs, "samples": samples, "final": final, "limit": limit,
              "final_checkpoint": models[final]["checkpoint_dir"]}
    home.atomic_write_json(out / "results.json", result)
    result["outputs"] = [str(out / "results.json")]
    return result


def chat_scores(result: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """({"task metric": value}, {"task metric": stderr}) of eval_chat's result: each task's main metric
    (exact match, ended, acc) and ChatCORE."""
    scores, errs = {}, {}
    info = (result.get("nanoforge") or {}).get("tasks") or {}
    for task, row in (result.get("results") or {}).items():
        key = "chatcore,none" if task == "chatcore" else (info.get(task) or {}).get("main_metric")
        if not key or row.get(key) is None:
            continue
        metric, _, filt = key.partition(",")
        name = "ChatCORE" if task == "chatcore" else f"{task} {metric}"
        scores[name] = _jsonable(row[key])
        err = row.get(f"{metric}_stderr,{filt}")
        if err is not None:
            errs[name] = _jsonable(err)
    return scores, errs


def _sample_conversations(checkpoint: str, max_tokens: int) -> list[list[dict[str, Any]]]:
    """Greedy replies to the first user turns of held-out default chat conversations (one per kind)."""
    from nanoforge.data.chat import default_chat_data, load_conversations
    from nanoforge.infer.engine import Engine, SamplingParams, load_checkpoint

    model, tok, _ = load_checkpoint(checkpoint)
    val = default_chat_data() / "val"
    picked: list[list[dict[str, Any]]] = []
    for f in sorted(p for p in val.rglob("*") if p.is_file()):
        convs = list(load_conversations(f))
        if convs:
            picked.append([m for m in _messages(convs[0]) if m.get("role") in ("system", "user")][:1])
        if len(picked) == SAMPLE_CONVERSATIONS:
            break
    engine = Engine(model, tok)
    prompts = [tok.render_for_completion({"messages": p}) for p in picked]
    replies = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max(max_tokens, 64)))
    return [p + [r.message()] for p, r in zip(picked, replies)]


def _messages(conv: Any) -> list[dict[str, Any]]:
    if isinstance(conv, dict):
        return list(conv["messages"])
    return list(getattr(conv, "messages", conv))


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

