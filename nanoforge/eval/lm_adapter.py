"""lm-evaluation-harness model type `nanoforge`: evaluates a native checkpoint without exporting it.

    nanoforge lm-eval --model nanoforge --model_args checkpoint=checkpoints/base/demo --tasks hellaswag_de
    lm_eval.simple_evaluate(model=NanoforgeLM(checkpoint="checkpoints/base/demo"), tasks=[...])

Importing this module registers the type (lm-eval 0.4.13 has no plugin entry point, so `nanoforge lm-eval`
imports it and then runs lm-eval's own CLI). Tokenization matches `--model hf` on our export: BOS is
prepended like the exported tokenizer's post-processor does, and lm-eval's `_encode_pair` splits
context and continuation, so both give the same log-likelihoods.
"""

from __future__ import annotations

import os
from typing import Any

import lm_eval.models  # noqa: F401 - registers lm-eval's own model types first (hf, ...)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from nanoforge.eval.packed import score_packed
from nanoforge.eval.scoring import score_rolling


@register_model("nanoforge")
class NanoforgeLM(TemplateLM):
    def __init__(self, checkpoint: str | None = None, model: Any = None, tokenizer: Any = None,
                 device: str = "cpu", batch_size: Any = 1, max_gen_toks: int = 256, max_batch_size: Any = None,
                 **unknown: Any) -> None:
        super().__init__()
        import torch

        from nanoforge.errors import UserError

        if unknown:
            raise UserError(f"--model_args: unknown argument(s) {', '.join(sorted(unknown))} for --model nanoforge "
                            f"(known: {', '.join(MODEL_ARGS)})")
        # lm-eval's CLI passes its own default device (cuda): fall back like its hf model does
        device = str(device or "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"

        if model is None:
            if checkpoint is None:
                raise UserError("--model_args needs checkpoint=PATH (a tag folder or model_<step>.safetensors)")
            from nanoforge.infer.engine import load_checkpoint

            model, tokenizer, _ = load_checkpoint(checkpoint, device=device, tokenizer=tokenizer)
        elif tokenizer is None:
            raise UserError("NanoforgeLM(model=...) needs tokenizer=...")
        self.model, self.tokenizer_ = model.eval(), tokenizer
        self.max_gen_toks = int(max_gen_toks)

    # ---- tokenization (what --model hf does with our exported tokenizer) --------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer_.bos_id if self.tokenizer_.bos_id is not None else self.tokenizer_.eos_id

    @property
    def max_length(self) -> int:
        return self.model.config.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer_.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        bos = self.tokenizer_.bos_id is not None and add_special_tokens is not False
        if add_special_tokens is None and self.tokenizer_.bos_id is not None:
            bos_text = self.tokenizer_.decode([self.tokenizer_.bos_id])
            bos = not string.startswith(bos_text)
        return self.tokenizer_.encode(string, bos=bos, parse_special=not bos)

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tokenizer_.decode(tokens)

    # ---- the three request types ------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False, **kwargs: Any
                              ) -> list[tuple[float, bool]]:
        from nanoforge import progress

        # The same packed shared-prefix scorer as `nanoforge eval tasks`: one row per context, many per forward.
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, ctx, _) in enumerate(requests):
            groups.setdefault(tuple(ctx), []).append(i)
        items = list(groups.items())
        out: list[Any] = [None] * len(requests)
        with progress.bar(total=len(items), desc="loglikelihood", unit="context") as pbar:
            for start in range(0, len(items), 256):
                part = items[start:start + 256]
                scores = score_packed(self.model, [(list(ctx), [requests[i][2] for i in idx]) for ctx, idx in part])
                for (_, idx), group in zip(part, scores):
                    for i, r in zip(idx, group):
                        out[i] = r
                        if self.cache_hook is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[i][0], r)
                pbar.update(len(part))
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in [r.args for r in requests]:
            out.append(score_rolling(self.model, self.tok_encode(text, add_special_tokens=False),
                                     self.prefix_token_id))
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from nanoforge.infer.engine import generate

        out = []
        for context, gen_kwargs in [r.args for r in requests]:
            kw = dict(gen_kwargs or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            text = generate(self.model, self.tokenizer_, self.tok_encode(context), max_new_tokens=max_new,
                            temperature=temperature)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def evaluate_with_lm_eval(model_or_checkpoint: Any, tasks: list[str], *, tokenizer: Any = None,
                          include_path: str | os.PathLike | None = None, limit: int | None = None,
                          num_fewshot: int | None = None, device: str = "cpu", **kwargs: Any) -> dict[str, Any]:
    """lm_eval.simple_evaluate on a native checkpoint (tag folder, model file) or a model object (pass its
    `tokenizer`); `include_path` is a folder of extra task YAMLs (lm-eval's --include_path). Returns
    lm-eval's results dict (results[task]["acc,none"], ...)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if isinstance(model_or_checkpoint, (str, os.PathLike)):
        lm = NanoforgeLM(checkpoint=str(model_or_checkpoint), tokenizer=tokenizer, device=device)
    else:
        lm = NanoforgeLM(model=model_or_checkpoint, tokenizer=tokenizer, device=device)
    manager = TaskManager(include_path=str(include_path)) if include_path else None
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                   num_fewshot=num_fewshot, **kwargs)


def run_lm_eval_cli(argv: list[str]) -> int:
    """Run lm-eval's own CLI with `argv` after registering the `nanoforge` model type."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    _check_model_args(argv)
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    finally:
        sys.argv = saved
    return 0


MODEL_ARGS = ("checkpoint", "tokenizer", "device", "batch_size", "max_batch_size", "max_gen_toks")


def _check_model_args(argv: list[str]) -> None:
    """For `--model nanoforge`: refuse unknown --model_args keys and a checkpoint that does not exist
    before lm-eval starts (its own errors are tracebacks)."""
    from nanoforge.checkpoint import resolve_checkpoint
    from nanoforge.errors import UserError

    def value(flag: str) -> str | None:
        for i, a in enumerate(argv):
            if a == flag and i + 1 < len(argv):
                return argv[i + 1]
            if a.startswith(flag + "="):
                return a.split("=", 1)[1]
        return None

    if value("--model") != "nanoforge":
        return
    raw = value("--model_args") or value("--model-args") or ""
    args = dict(kv.split("=", 1) if "=" in kv else (kv, "") for kv in raw.split(",") if kv.strip())
    unknown = sorted(set(args) - set(MODEL_ARGS))
    if unknown:
        raise UserError(f"--model_args: unknown argument(s) {', '.join(unknown)} for --model nanoforge "
                        f"(known: {', '.join(MODEL_ARGS)})")
    if not args.get("checkpoint"):
        raise UserError("--model_args needs checkpoint=PATH (a tag folder or model_<step>.safetensors)")
    resolve_checkpoint(args["checkpoint"])
