"""`nanoforge eval chat`: chat models on task YAMLs (the `eval tasks` format), asked in the chat format.

    report = eval_chat("checkpoints/sft/demo", ["arithmetic_chat", "arc_easy_chat.yaml"], limit=200)
    report["results"]["chatcore"]["chatcore,none"]

- `output_type: multiple_choice` is categorical (nanochat's chat_eval): the question and its options
  lettered A, B, C, ... become one user message; the logits at the answer position (right after
  `<|assistant_start|>`) are compared over the option letters only, the largest is the answer. acc.
- `output_type: generate_until`: doc_to_text is the user message (or, with `metadata.messages: FIELD`,
  the document's conversation without its last assistant turn is the prompt); the reply is generated
  greedily by the engine with tool calls executed (the calculator), until `<|assistant_end|>` or
  generation_kwargs.max_gen_toks; then the task's filter_list and exact_match as lm-eval scores them
  (GSM8K: `#### n`). `ended`: the fraction of replies that ended with `<|assistant_end|>` in the budget.
- ChatCORE (nanochat's aggregate): every task's accuracy centred on chance, (acc − chance) / (1 − chance)
  with chance = the mean of 1 / options for multiple choice and 0 for generative tasks, averaged.

Results come in lm-eval's layout (results[task]["acc,none"], "acc_stderr,none", n-samples, config) with a
`chatcore` row, so `nanoforge eval compare` reads them; `nanoforge.samples` keeps a few replies per task.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nanoforge import home as home_mod
from nanoforge import progress
from nanoforge.errors import UserError
from nanoforge.eval import metrics as M
from nanoforge.eval.taskspec import TaskError, TaskSpec, load_task

CHAT_TASKS = Path(__file__).parent / "tasks" / "chat"
DEFAULT_CHAT = "{default_chat}"  # in a bundled task's data_files: the offline default chat data folder

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ASSISTANT_END = "<|assistant_end|>"
SAMPLES_KEPT = 3


def letter_ids(tokenizer: Any, n: int) -> list[int]:
    """Token id of each of the first n letters; UserError if a letter is not a single token."""
    out = []
    for letter in LETTERS[:n]:
        ids = tokenizer.encode(letter)
        if len(ids) != 1:
            raise UserError(f"option letter {letter!r} is {len(ids)} tokens for tokenizer "
                            f"{getattr(tokenizer, 'name', '')}; categorical scoring needs one token per letter")
        out.append(ids[0])
    return out


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _prompt(tokenizer: Any, spec: TaskSpec, doc: dict[str, Any]) -> list[int]:
    field = (spec.config.get("metadata") or {}).get("messages")
    if field:
        if field not in doc:
            raise TaskError(f"{spec.where('metadata')}: documents have no field {field!r} (metadata.messages)")
        return tokenizer.render_for_completion({"messages": doc[field]})
    return tokenizer.render_for_completion(_user(spec.doc_to_text(doc)))


@torch.no_grad()
def categorical(model: Any, tokenizer: Any, spec: TaskSpec, docs: list[dict[str, Any]], *,
                batch_size: int = 16) -> tuple[dict[str, list[float]], list[float], list[dict[str, Any]]]:
    """({"acc": per doc}, chance per doc, samples): the option letter with the largest logit at the
    answer position, among the document's letters only."""
    items = []
    for doc in docs:
        choices = spec.doc_to_choice(doc)
        if len(choices) > len(LETTERS):
            raise TaskError(f"{spec.where('doc_to_choice')}: {len(choices)} options, at most {len(LETTERS)}")
        gold = spec.gold_index(doc, choices)
        gold = gold[0] if isinstance(gold, list) else gold
        from nanoforge.data.chat import mc_question

        prompt = tokenizer.render_for_completion(_user(mc_question(spec.doc_to_text(doc), choices)))
        items.append((prompt, letter_ids(tokenizer, len(choices)), int(gold)))
    device = next(model.parameters()).device
    acc, samples = [], []
    pad = tokenizer.bos_id if tokenizer.bos_id is not None else 0
    for start in progress.bar(range(0, len(items), batch_size), desc=spec.name, unit="batch"):
        part = items[start:start + batch_size]
        prompts = [p for p, _, _ in part]
        T = max(len(p) for p in prompts)
        x = torch.full((len(part), T), pad, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            x[i, :len(p)] = torch.tensor(p, device=device)
        logits = model(x)  # right padding: position len-1 sees only its own prompt
        for i, (p, letters, gold) in enumerate(part):
            scores = logits[i, len(prompts[i]) - 1, letters]
            pick = int(scores.argmax())
            acc.append(float(pick == gold))
            if len(samples) < SAMPLES_KEPT:
                samples.append({"prompt": tokenizer.decode(p), "reply": LETTERS[pick], "target": LETTERS[gold]})
    chance = [1.0 / len(letters) for _, letters, _ in items]
    return {"acc": acc}, chance, samples


def generative(model: Any, tokenizer: Any, spec: TaskSpec, docs: list[dict[str, Any]], *, batch_size: int = 16,
               max_new_tokens: int | None = None) -> tuple[dict[str, list[float]], list[dict[str, Any]]]:
    """({"exact_match,<filter>": per doc, "ended,none": per doc}, samples): greedy replies by the engine
    (tools executed), filtered and exact-matched as lm-eval does."""
    from nanoforge.infer.engine import Engine, SamplingParams

    gk = dict(spec.config.get("generation_kwargs") or {})
    max_new = int(max_new_tokens or gk.get("max_gen_toks", 256))
    until = gk.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    filters = spec.config.get("filter_list") or [{"name": "none", "filter": [{"function": "take_first"}]}]
    em_args = spec.metric_args("exact_match")
    end_id = tokenizer.special_id(ASSISTANT_END)
    prompts = [_prompt(tokenizer, spec, d) for d in docs]
    engine = Engine(model, tokenizer, max_batch=batch_size)
    params = SamplingParams(temperature=0.0, max_tokens=max_new, stop=tuple(until))
    scored = "exact_match" in spec.metrics  # metric_list: [ended] asks only whether replies end
    values: dict[str, list[float]] = {f"exact_match,{f['name']}": [] for f in filters} if scored else {}
    values["ended,none"] = []
    samples = []
    with progress.bar(total=len(docs), desc=spec.name, unit="doc") as bar:
        for start in range(0, len(docs), batch_size):
            done = engine.generate(prompts[start:start + batch_size], params)
            for doc, prompt, c in zip(docs[start:start + batch_size], prompts[start:start + batch_size], done):
                ref = spec.target_string(doc)
                for f in filters if scored else []:
                    try:
                        pred = M.apply_filters(c.text, f.get("filter", []))
                    except ValueError as e:
                        raise TaskError(f"{spec.where('filter_list')}: {e}") from None
                    values[f"exact_match,{f['name']}"].append(M.exact_match(pred, ref, **em_args))
                values["ended,none"].append(float(bool(c.ids) and c.ids[-1] == end_id))
                if len(samples) < SAMPLES_KEPT:
                    samples.append({"prompt": tokenizer.decode(prompt), "reply": tokenizer.decode(c.ids),
                                    "target": ref})
            bar.update(len(done))
    return values, samples


def chatcore(rows: dict[str, dict[str, Any]]) -> float | None:
    """Mean over tasks of accuracy centred on chance (each row's `centered,none`)."""
    centred = [r["centered,none"] for r in rows.values() if "centered,none" in r]
    return sum(centred) / len(centred) if centred else None


def eval_chat(checkpoint_or_model: Any, tasks: Sequence[str | os.PathLike | TaskSpec], *, limit: int | None = None,
              out: str | os.PathLike | None = None, tokenizer: Any = None, device: str = "cpu",
              batch_size: int = 16, max_new_tokens: int | None = None) -> dict[str, Any]:
    """Evaluate a chat checkpoint (tag folder, model file) or a model object (pass `tokenizer`) on chat tasks
    (bundled names or YAML paths). Returns lm-eval's results layout with, per task, `acc,none` (multiple
    choice) or `exact_match,<filter>` and `ended,none` (generative), `centered,none`, and a `chatcore` row;
    written atomically to `out` when given. Bad task files and missing data fail before the model loads."""
    from nanoforge.eval.tasks import _model_and_tokenizer

    specs = [t if isinstance(t, TaskSpec) else load_chat_task(t) for t in tasks]
    if not specs:
        raise UserError("no tasks given (bundled chat tasks: `nanoforge eval chat --list`)")
    for spec in specs:
        spec.docs()
    model, tok, info = _model_and_tokenizer(checkpoint_or_model, tokenizer, device)
    model.eval()
    results: dict[str, Any] = {}
    n_samples: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for spec in specs:
        docs = spec.docs()
        chosen = docs[:limit] if limit else docs
        if not chosen:
            raise TaskError(f"{spec.where('dataset_kwargs')}: task {spec.name!r} has no documents")
        t0 = time.perf_counter()
        if spec.output_type == "multiple_choice":
            values, chance, samples = categorical(model, tok, spec, chosen, batch_size=batch_size)
            values = {"acc,none": values["acc"]}
            main_key, base = "acc,none", sum(chance) / len(chance)
        else:
            values, samples = generative(model, tok, spec, chosen, batch_size=batch_size,
                                         max_new_tokens=max_new_tokens)
            main_key, base = next(iter(values)), 0.0
        seconds = time.perf_counter() - t0
        row: dict[str, Any] = {"alias": spec.name}
        for key, vals in values.items():
            metric, filt = key.split(",", 1)
            row[key] = sum(vals) / len(vals)
            row[f"{metric}_stderr,{filt}"] = M.mean_stderr(vals)
        if (spec.config.get("metadata") or {}).get("chatcore", True):
            row["centered,none"] = (row[main_key] - base) / (1.0 - base)
        results[spec.name] = row
        n_samples[spec.name] = {"original": len(docs), "effective": len(chosen)}
        extra[spec.name] = {"seconds": round(seconds, 4), "chance": base, "main_metric": main_key,
                            "path": str(spec.path), "samples": samples}
        progress.log(f"{spec.name}: " + "  ".join(f"{k}={v:.4f}" for k, v in row.items()
                                                  if isinstance(v, float) and "stderr" not in k))
    score = chatcore(results)
    if score is not None:
        results["chatcore"] = {"alias": "ChatCORE", "chatcore,none": score}
    report = {"results": results, "n-samples": n_samples, "config": info,
              "nanoforge": {"tasks": extra, "limit": limit, "chatcore": score}}
    if out is not None:
        home_mod.atomic_write_json(Path(out), report)
    return report


def load_chat_task(name_or_path: str | os.PathLike) -> TaskSpec:
    """load_task, with `{default_chat}` in data_files replaced by the default chat data folder (built on
    first use, see nanoforge.data.chat.default_chat_data)."""
    p = Path(name_or_path).expanduser()
    if not p.suffix and not p.exists() and (CHAT_TASKS / f"{name_or_path}.yaml").is_file():
        p = CHAT_TASKS / f"{name_or_path}.yaml"
    elif not p.suffix and not p.exists():
        names = ", ".join(t["task"] for t in list_chat_tasks())
        raise TaskError(f"unknown chat task {name_or_path!r}: give a YAML file or one of {names}")
    spec = load_task(p)
    kwargs = spec.config.get("dataset_kwargs") or {}
    files = kwargs.get("data_files")
    if files is not None and DEFAULT_CHAT in str(files):
        from nanoforge.data.chat import default_chat_data

        root = str(default_chat_data())

        def sub(v: Any) -> Any:
            if isinstance(v, str):
                return v.replace(DEFAULT_CHAT, root)
            if isinstance(v, list):
                return [sub(x) for x in v]
            return {k: sub(x) for k, x in v.items()}

        spec.config["dataset_kwargs"] = {**kwargs, "data_files": sub(files)}
    return spec


def list_chat_tasks() -> list[dict[str, Any]]:
    """Bundled chat tasks (nanoforge/eval/tasks/chat/*.yaml): task, path, output type, about."""
    rows = []
    for f in sorted(CHAT_TASKS.glob("*.yaml")):
        first = f.read_text(encoding="utf-8").splitlines()[0]
        spec = load_task(f)
        rows.append({"task": spec.name, "path": str(f), "output_type": spec.output_type,
                     "about": first.lstrip("# ").strip() if first.startswith("#") else ""})
    return rows
