"""`nanoforge eval tasks`: multiple-choice (log-likelihood) and generative (exact match) tasks on a checkpoint,
scored as lm-evaluation-harness scores them, written in lm-eval's results layout so `eval compare` and
other tools read both.

    results = run_tasks("checkpoints/base/demo", ["demo_mc", "my_task.yaml"], limit=100)
    results["results"]["demo_mc"]["acc_norm,none"]
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
from nanoforge.eval.scoring import encode_pair
from nanoforge.eval.taskspec import TaskError, TaskSpec, load_task


def _model_and_tokenizer(checkpoint_or_model: Any, tokenizer: Any, device: str) -> tuple[Any, Any, dict[str, Any]]:
    if isinstance(checkpoint_or_model, torch.nn.Module):
        if tokenizer is None:
            raise UserError("run_tasks on a model object needs its tokenizer (tokenizer=...)")
        if isinstance(tokenizer, (str, os.PathLike)):
            from nanoforge.tokenizer import Tokenizer

            tokenizer = Tokenizer.load(tokenizer)
        return checkpoint_or_model, tokenizer, {"model": "nanoforge", "model_args": "in-memory model"}
    from nanoforge.infer.engine import load_checkpoint

    model, tok, meta = load_checkpoint(checkpoint_or_model, device=device, tokenizer=tokenizer)
    return model, tok, {"model": "nanoforge", "model_args": f"checkpoint={checkpoint_or_model}",
                        "step": meta.get("step"), "tokenizer_fingerprint": tok.fingerprint}


def evaluate_multiple_choice(model: Any, tokenizer: Any, spec: TaskSpec, docs: list[dict[str, Any]],
                             contexts: list[str], *, batch_tokens: int = 8192) -> dict[str, list[float]]:
    """Per-document metric values (acc, acc_norm, and mc2 when asked for). A task scored by the truthfulqa mc2
    hook reports mc2 under lm-eval's name `acc` (as lm-eval's okapi truthfulqa_*_mc2 does), and as `mc2`."""
    delim = spec.config.get("target_delimiter", " ")
    mc2_task = _is_mc2_task(spec)
    want_mc2 = mc2_task or "mc2" in spec.metrics
    groups = []
    for doc, ctx in zip(docs, contexts):
        choices = spec.doc_to_choice(doc)
        pairs = [encode_pair(tokenizer, ctx, delim + c) for c in choices]
        # one context per document unless trailing-space moves changed it (then score each separately)
        groups.append((doc, choices, pairs))
    all_lls = _score_docs(model, [pairs for _, _, pairs in groups], desc=spec.name, batch_tokens=batch_tokens)
    values: dict[str, list[float]] = {m: [0.0] * len(groups) for m in ("acc", "acc_norm", "mc2")}
    for i, (doc, choices, _) in enumerate(groups):
        lls = all_lls[i]
        if want_mc2:
            values["mc2"][i] = M.mc2(lls, doc["mc2_targets_labels"])  # as truthfulqa_utils.process_results_mc2
        r = M.multiple_choice(lls, choices, spec.gold_index(doc, choices))
        values["acc"][i], values["acc_norm"][i] = r["acc"], r["acc_norm"]
    if mc2_task:
        values["acc"] = values["mc2"]
        return {m: values[m] for m in ("acc", "mc2")}
    return {m: v for m, v in values.items() if m in spec.metrics}


def _is_mc2_task(spec: TaskSpec) -> bool:
    hook = spec.config.get("process_results")
    return getattr(hook, "name", None) == "truthfulqa_utils.process_results_mc2"


def _score_docs(model: Any, docs_pairs: list[list[tuple[list[int], list[int]]]], *, desc: str = "score",
                chunk: int = 256, batch_tokens: int = 8192) -> list[list[float]]:
    """Summed log-likelihood of every (context, continuation) pair of every document: the choices sharing
    a context are packed into one row with it (nanoforge.eval.packed), many documents per forward."""
    from nanoforge.eval.packed import score_packed

    requests, owners = [], []
    for d, pairs in enumerate(docs_pairs):
        by_ctx: dict[tuple[int, ...], list[int]] = {}
        for j, (ctx, _) in enumerate(pairs):
            by_ctx.setdefault(tuple(ctx), []).append(j)
        for ctx, idx in by_ctx.items():
            requests.append((list(ctx), [pairs[j][1] for j in idx]))
            owners.append((d, idx))
    out = [[0.0] * len(pairs) for pairs in docs_pairs]
    with progress.bar(total=len(docs_pairs), desc=desc, unit="doc") as pbar:
        for start in range(0, len(requests), chunk):
            part = range(start, min(start + chunk, len(requests)))
            for r, scores in zip(part, score_packed(model, [requests[r] for r in part], max_batch_tokens=batch_tokens)):
                d, idx = owners[r]
                for j, (ll, _) in zip(idx, scores):
                    out[d][j] = ll
            pbar.update(len({owners[r][0] for r in part}))
    return out


def evaluate_generative(model: Any, tokenizer: Any, spec: TaskSpec, docs: list[dict[str, Any]],
                        contexts: list[str]) -> dict[str, list[float]]:
    """Greedy generation until a stop string, then each filter pipeline, then exact match per filter."""
    from nanoforge.infer.engine import generate

    gk = dict(spec.config.get("generation_kwargs") or {})
    until = gk.get("until") or [spec.config.get("fewshot_delimiter", "\n\n")]
    until = [until] if isinstance(until, str) else list(until)
    max_new = int(gk.get("max_gen_toks", 256))
    filters = spec.config.get("filter_list") or [{"name": "none", "filter": [{"function": "take_first"}]}]
    em_args = spec.metric_args("exact_match")
    values: dict[str, list[float]] = {f"exact_match,{f['name']}": [] for f in filters}
    for doc, ctx in progress.bar(list(zip(docs, contexts)), desc=spec.name, unit="doc"):
        ids = tokenizer.encode(ctx, bos=tokenizer.bos_id is not None)
        text = generate(model, tokenizer, ids, max_new_tokens=max_new, temperature=0.0)
        for stop in until:
            text = text.split(stop)[0]
        ref = spec.target_string(doc)
        for f in filters:
            try:
                pred = M.apply_filters(text, f.get("filter", []))
            except ValueError as e:
                raise TaskError(f"{spec.where('filter_list')}: {e}") from None
            values[f"exact_match,{f['name']}"].append(M.exact_match(pred, ref, **em_args))
    return values


def run_tasks(checkpoint_or_model: Any, tasks: Sequence[str | os.PathLike | TaskSpec], *, limit: int | None = None,
              num_fewshot: int | None = None, out: str | os.PathLike | None = None, tokenizer: Any = None,
              device: str = "cpu", batch_tokens: int = 8192) -> dict[str, Any]:
    """Evaluate a checkpoint (tag folder, model file) or a model object (pass `tokenizer`) on tasks (bundled
    names or YAML paths). Returns lm-eval's results layout: results[task]["acc,none"], "acc_stderr,none", ...,
    plus n-samples and a `nanoforge` section with timing; written to `out` (JSON) when given.
    Multiple-choice questions are scored many per forward, up to `batch_tokens` (padded) tokens each."""
    if limit is not None and limit < 0:
        raise UserError(f"--limit must be >= 0 (0 = every document), got {limit}")
    if out is not None:
        home_mod.ensure_parent(out, "results file")  # before the work, not after it
    specs = [t if isinstance(t, TaskSpec) else load_task(t) for t in tasks]  # bad task files fail fast
    for spec in specs:
        spec.docs()
    model, tok, info = _model_and_tokenizer(checkpoint_or_model, tokenizer, device)
    model.eval()
    results: dict[str, Any] = {}
    n_samples: dict[str, Any] = {}
    timing: dict[str, Any] = {}
    for spec in specs:
        docs = spec.docs()
        chosen = docs[:limit] if limit else docs
        k = num_fewshot if num_fewshot is not None else int(spec.config.get("num_fewshot") or 0)
        contexts = spec.contexts(chosen, k)
        t0 = time.perf_counter()
        if spec.output_type == "multiple_choice":
            values = evaluate_multiple_choice(model, tok, spec, chosen, contexts, batch_tokens=batch_tokens)
            values = {f"{m},none": v for m, v in values.items()}
        else:
            values = evaluate_generative(model, tok, spec, chosen, contexts)
        seconds = time.perf_counter() - t0
        row: dict[str, Any] = {"alias": spec.name}
        for key, vals in values.items():
            metric, filt = key.split(",", 1)
            row[key] = sum(vals) / len(vals) if vals else float("nan")
            row[f"{metric}_stderr,{filt}"] = M.mean_stderr(vals)
        results[spec.name] = row
        n_samples[spec.name] = {"original": len(docs), "effective": len(chosen)}
        timing[spec.name] = {"seconds": round(seconds, 4), "examples_per_second": len(chosen) / max(seconds, 1e-9),
                             "num_fewshot": k, "path": str(spec.path)}
        progress.log(f"{spec.name}: " + "  ".join(f"{k_}={v:.4f}" for k_, v in row.items()
                                                     if isinstance(v, float) and "stderr" not in k_))
    report = {"results": results, "n-samples": n_samples, "config": info,
              "nanoforge": {"tasks": timing, "limit": limit}}
    if out is not None:
        home_mod.atomic_write_json(Path(out), report)
    return report


def evaluate_bpb_checkpoint(checkpoint: str | os.PathLike, tokens: str | os.PathLike, *, batch_size: int = 8,
                            seq_len: int | None = None, device: str = "cpu", max_batches: int | None = None,
                            tokenizer: Any = None) -> dict[str, Any]:
    """Validation bits per byte of a checkpoint on token shards; refuses shards made by another tokenizer,
    a `seq_len` beyond the model's context, and batch counts below 1. `tokenizer` replaces the one the
    checkpoint names (for a tokenizer that moved)."""
    from nanoforge import dist
    from nanoforge.eval.bpb import evaluate_bpb
    from nanoforge.infer.engine import load_checkpoint

    for what, value in (("--batch-size", batch_size), ("--seq-len", seq_len), ("--max-batches", max_batches)):
        if value is not None and value < 1:
            raise UserError(f"{what} must be at least 1, got {value}")
    device = str(dist.parse_device(device))
    tokens_dir = home_mod.resolve(tokens, "tokens")
    if not (tokens_dir / "meta.json").is_file():
        raise UserError(f"token shards {tokens_dir} not found (no meta.json; make them with `nanoforge data tokenize`)")
    shards_meta = home_mod.read_json(tokens_dir / "meta.json", "token shards meta")
    model, tok, meta = load_checkpoint(checkpoint, device=device, tokenizer=tokenizer)
    if seq_len is not None and seq_len > model.config.max_seq_len:
        raise UserError(f"--seq-len {seq_len} is longer than the model's context (model.max_seq_len = "
                        f"{model.config.max_seq_len}); it would score positions it was never trained on")
    fp = shards_meta.get("tokenizer_fingerprint")
    if fp and fp != tok.fingerprint:
        raise UserError(f"token shards {tokens_dir} were made with tokenizer {fp} but checkpoint {checkpoint} uses "
                        f"{tok.fingerprint}: evaluate on shards tokenized with the model's tokenizer")
    # Under torchrun each rank scores its share of the split and the sums are all-reduced.
    info = dist.setup(dist.parse_device(device).type)
    try:
        r = evaluate_bpb(model, tokens_dir, tok.token_bytes, batch_size=batch_size,
                         seq_len=seq_len or model.config.max_seq_len, device=device, max_batches=max_batches,
                         rank=info.rank, world_size=info.world_size)
    finally:
        dist.teardown(info)
    return {**r, "checkpoint": str(checkpoint), "step": meta.get("step"), "tokens": r["tokens"],
            "tokens_dir": str(tokens_dir), "world_size": info.world_size, "rank": info.rank}
