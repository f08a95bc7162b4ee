"""The one training loop, for every stage: base pretraining on token shards, and mid/SFT on conversations
(nanoforge/train/sft.py gives it a `ChatData`); what differs is the data source and the config.

    nanoforge train base --preset cpu-demo --tokens de4k --tag demo
    torchrun --nproc_per_node=2 -m nanoforge train base --preset ci --tokens de512 --tag ddp

Per optimizer step: `accum` micro-batches (derived from train.total_batch_tokens), gradient clipping,
AdamW or Muon, the lr schedule. Every eval_every steps: validation bits per byte; every sample_every
steps: the eval.prompts sampled greedily; metrics to runs/<run>/metrics.jsonl. SIGINT/SIGTERM finish the
current step, write a checkpoint and return (`interrupted` in the summary); `resume=True` continues the
latest checkpoint of the tag exactly (weights, optimizer, loader position, RNG, step).

The loss of an optimizer step is the mean over ALL its learned tokens, across micro-batches and ranks
(not a mean of per-micro-batch means): each micro-batch's mean is weighted by its share of the step's
tokens, so accumulation over 4 micro-batches gives the gradient of one 4x batch. A step without any
learned token (every target masked) is skipped and counted in `skipped_steps`; it never yields NaN.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanoforge import checkpoint as ckpt
from nanoforge import dist as D
from nanoforge import home, progress
from nanoforge.config import RunConfig, load_config
from nanoforge.errors import UserError
from nanoforge.train.optim import build_optimizer, freeze_except, lr_multiplier, set_lr

RUN_OWNER = "train.json"  # runs/<run>/train.json: {"phase", "tag"} of the training that writes the run


def train(config: RunConfig | dict[str, Any] | str, *, tokens: str | None = None, tag: str, run: str | None = None,
          phase: str = "base", resume: bool = False, own_run: bool = False, data: Any = None) -> dict[str, Any]:
    """Train per `config` (a RunConfig, its dict, or a preset name) on token shards `tokens` (a name under
    tokens/ or a path), or on `data` (a data source such as sft.ChatData); checkpoints go to
    checkpoints/<phase>/<tag>/. Returns a summary dict: step, loss, val_bpb, tokens_per_second, mfu,
    checkpoint, metrics, run_dir, interrupted, skipped_steps (and the data source's val_* numbers).
    Holds the locks of the tag and of the run folder while it trains. A run folder belongs to one training:
    one that another tag wrote metrics to is refused (`own_run=True`: the caller owns it, as a speedrun
    does its own, and the training's metrics replace the old ones).
    Refuses (UserError): an invalid tag or run name, a tag or run folder in use by another process,
    missing shards, a batch that does not divide into micro-batches, an existing tag without resume, and on
    resume a different tokenizer, model shape or number of processes, or a run that is already complete."""
    if (tokens is None) == (data is None):
        raise UserError("train needs exactly one of tokens= (token shards) or data= (a data source)")
    cfg = _as_config(config)
    source = data if data is not None else TokenData(tokens)
    tc = cfg.train
    device = _device(tc.device)
    info = D.setup(device.type)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    try:
        trainer = _Trainer(cfg, data=source, tag=tag, run=run, phase=phase, resume=resume, device=device,
                           info=info, own_run=own_run)
        with contextlib.ExitStack() as held:
            error = None
            if info.is_main:
                try:
                    held.enter_context(home.lock(trainer.ckpt_dir, f"checkpoint tag '{tag}'"))
                    held.enter_context(home.lock(trainer.run_dir, "run folder"))
                    trainer.check_run_folder()
                except UserError as e:
                    error = e
            if D.any_rank(error is not None, info, device):
                raise error or UserError(f"rank 0 could not start the training of tag '{tag}' (see its message)")
            return trainer.run()
    finally:
        D.teardown(info)


class _Interrupt:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (then saves and returns)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Interrupt:
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C aborts without waiting for the step
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class TokenData:
    """Base pretraining data: token shards (a name under tokens/ or a folder), scored by val bits per byte.
    The interface every data source gives the loop: prepare, tokenizer, init_weights, default_steps,
    loader, evaluate, sample, describe, meta."""

    kind = "token shards"

    def __init__(self, tokens: str | Path) -> None:
        self.tokens_dir = home.resolve(tokens, "tokens")
        self.tokens_name = str(tokens)
        self.tokenizer: Any = None

    def prepare(self, cfg: RunConfig) -> None:
        meta = self._tokens_meta()
        self.tokenizer = self._find_tokenizer(meta)
        if cfg.model.vocab_size != int(meta["vocab_size"]):
            progress.log(f"model.vocab_size {cfg.model.vocab_size} -> {meta['vocab_size']} (the tokenizer's)")
            cfg.model.vocab_size = int(meta["vocab_size"])

    def describe(self) -> str:
        return f"token shards {self.tokens_dir}"

    def init_weights(self, model: torch.nn.Module) -> None:
        """Base training starts from the seeded random init."""

    def default_steps(self, cfg: RunConfig, world_size: int) -> int:
        tc = cfg.train
        return math.ceil(tc.token_ratio * cfg.model_config().num_params() / tc.total_batch_tokens)

    def loader(self, cfg: RunConfig, info: D.DistInfo, device: torch.device) -> Any:
        from nanoforge.data.loader import TokenLoader

        tc = cfg.train
        return TokenLoader(self.tokens_dir, split="train", batch_size=tc.device_batch_size, seq_len=tc.seq_len,
                           layout=cfg.data.layout, rank=info.rank, world_size=info.world_size, seed=tc.seed,
                           device=str(device), infinite=True)

    def evaluate(self, model: torch.nn.Module, cfg: RunConfig, info: D.DistInfo, device: torch.device,
                 autocast: torch.dtype | None) -> dict[str, float]:
        from nanoforge.eval.bpb import evaluate_bpb

        tc = cfg.train
        result = evaluate_bpb(model, self.tokens_dir, self.tokenizer.token_bytes, batch_size=tc.device_batch_size,
                              seq_len=tc.seq_len, device=device, max_batches=tc.eval_batches or None,
                              layout=cfg.data.layout, rank=info.rank, world_size=info.world_size,
                              autocast_dtype=autocast)
        return {"val_bpb": round(result["val_bpb"], 6)}

    def sample(self, model: torch.nn.Module, cfg: RunConfig) -> list[dict[str, str]]:
        from nanoforge.infer.engine import generate

        prompts, n = cfg.eval.prompts, cfg.eval.max_new_tokens
        return [{"prompt": p, "completion": generate(model, self.tokenizer, p, max_new_tokens=n)} for p in prompts]

    def meta(self) -> dict[str, Any]:
        return {"tokens": self.tokens_name, "tokens_path": str(self.tokens_dir)}

    def _tokens_meta(self) -> dict[str, Any]:
        if not (self.tokens_dir / "meta.json").exists():
            raise UserError(f"token shards {self.tokens_dir} not found (make them with `nanoforge data tokenize`)")
        meta = home.read_json(self.tokens_dir / "meta.json", "token shards meta")
        if "vocab_size" not in meta:
            raise UserError(f"token shards meta {self.tokens_dir / 'meta.json'} has no vocab_size")
        return meta

    def _find_tokenizer(self, meta: dict[str, Any]) -> Any:
        """The tokenizer the shards were made with (for token_bytes and samples)."""
        from nanoforge.tokenizer import Tokenizer

        candidates = [meta.get(k) for k in ("tokenizer_path", "tokenizer", "tokenizer_name")]
        if isinstance(meta.get("tokenizer"), dict):
            candidates += [meta["tokenizer"].get("path"), meta["tokenizer"].get("name")]
        for c in candidates:
            if isinstance(c, str) and c:
                try:
                    tok = Tokenizer.load(c)
                except Exception:  # noqa: BLE001 - try the next candidate
                    continue
                fp = meta.get("tokenizer_fingerprint")
                if fp and tok.fingerprint != fp:
                    raise UserError(f"tokenizer {c} has fingerprint {tok.fingerprint} but the token shards "
                                    f"{self.tokens_dir} were made with {fp}: re-tokenize the corpus")
                return tok
        raise UserError(f"cannot find the tokenizer of token shards {self.tokens_dir} (meta.json names "
                        f"{[c for c in candidates if c]}); is it still under tokenizers/?")


def learned_tokens(targets: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """How many positions of a batch are trained on: target not -1 and (if given) mask true."""
    valid = targets != -1
    return (valid & mask.bool()).sum() if mask is not None else valid.sum()


def accumulate_gradients(model: torch.nn.Module, micro_batches: list[tuple[torch.Tensor, ...]], *,
                         info: D.DistInfo | None = None, parallel: str = "ddp",
                         autocast: torch.dtype | None = None,
                         loss_fn: Any = None) -> tuple[torch.Tensor, int]:
    """Backward over the micro-batches of one optimizer step with the loss normalised over ALL their learned
    tokens on all ranks: micro-batch i's mean is weighted by count_i × world / total (DDP then averages over
    the world). Returns (this rank's share of the step's mean loss, detached; the total learned tokens).
    When the total is 0 nothing runs and (0, 0) comes back: the caller skips the step. A micro-batch with
    no learned token still runs forward and backward (DDP needs every rank's hooks) with a zero loss.
    Micro-batches are (inputs, targets, mask, ...); `loss_fn(model, micro_batch, scale)`, when given, returns
    a micro-batch's share of the step's loss for scale = processes / learned tokens of the step (the RL
    phase weights each token by its sequence's advantage); the default is the mean cross-entropy."""
    info = info or D.DistInfo()
    device = micro_batches[0][0].device
    counts_t = torch.stack([learned_tokens(mb[1], mb[2]) for mb in micro_batches]).to(device)
    total_t = counts_t.sum()
    if info.enabled:
        torch.distributed.all_reduce(total_t)
    total = int(total_t.item())
    loss_sum = torch.zeros((), device=device)
    if total == 0:
        return loss_sum, 0
    counts = counts_t.tolist()
    n = len(micro_batches)
    for i, mb in enumerate(micro_batches):
        inputs, targets, mask = mb[:3]
        sync = (model.no_sync() if info.enabled and parallel == "ddp" and i < n - 1 else contextlib.nullcontext())
        with sync:
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                if counts[i] and loss_fn is not None:
                    loss = loss_fn(model, mb, info.world_size / total)
                elif counts[i]:
                    loss = model(inputs, targets, mask) * (counts[i] * info.world_size / total)
                else:
                    loss = model(inputs, targets, mask, reduction="none")[0].sum() * 0.0
            loss.backward()
        loss_sum += loss.detach()
    return loss_sum, total


class _Trainer:
    def __init__(self, cfg: RunConfig, *, data: Any, tag: str, run: str | None, phase: str, resume: bool,
                 device: torch.device, info: D.DistInfo, own_run: bool = False) -> None:
        self.cfg, self.tc, self.info, self.device = cfg, cfg.train, info, device
        self.phase, self.tag, self.resume, self.own_run = phase, tag, resume, own_run
        self.data = data
        self.run_name = run or f"{phase}-{tag}"
        self.ckpt_dir = home.checkpoint_dir(phase, tag)
        self.run_dir = home.run_dir(self.run_name)

    # --- setup --------------------------------------------------------------------------------------
    def check_run_folder(self) -> None:
        """A run folder belongs to the training that made it: refuse one another tag wrote metrics to.
        runs/<run>/train.json names the owner (phase and tag)."""
        owner_path = self.run_dir / RUN_OWNER
        me = {"phase": self.phase, "tag": self.tag}
        owner = home.read_json(owner_path, "run owner") if owner_path.is_file() else None
        foreign = (owner is not None and {k: owner.get(k) for k in me} != me) or \
            (owner is None and (self.run_dir / "metrics.jsonl").exists() and not self.resume)
        if foreign and not self.own_run:
            whose = f"the training of tag '{owner.get('tag')}' ({owner.get('phase')})" if owner else \
                "another training"
            raise UserError(f"run folder {self.run_dir} belongs to {whose}: pick another --run "
                            f"(default: {self.phase}-{self.tag}), or continue that training with --resume --tag "
                            f"{owner.get('tag') if owner else 'TAG'}")
        if owner != me:
            home.atomic_write_json(owner_path, me)

    def run(self) -> dict[str, Any]:
        tc, info = self.tc, self.info
        self.data.prepare(self.cfg)
        self.tokenizer = self.data.tokenizer
        mc = self.cfg.model_config()
        micro_tokens = tc.device_batch_size * tc.seq_len * info.world_size
        if tc.total_batch_tokens % micro_tokens:
            raise UserError(
                f"train.total_batch_tokens={tc.total_batch_tokens} is not a multiple of device_batch_size × "
                f"seq_len × processes = {tc.device_batch_size} × {tc.seq_len} × {info.world_size} = {micro_tokens}; "
                f"set train.total_batch_tokens to a multiple of {micro_tokens}")
        self.accum = tc.total_batch_tokens // micro_tokens
        self.max_steps = tc.max_steps or self.data.default_steps(self.cfg, info.world_size)

        resume_meta = self._check_resume(mc)
        torch.manual_seed(tc.seed)
        from nanoforge.model import LLaMA

        raw = LLaMA(mc)
        if resume_meta is not None:
            ckpt.load_weights(raw, ckpt.load_state_dict(self.ckpt_dir, resume_meta["step"]),
                              where=f"{self.ckpt_dir} step {resume_meta['step']}")
        else:
            self.data.init_weights(raw)
        raw.to(self.device)
        freeze_except(raw, tc.trainable)
        self.raw = raw
        model: torch.nn.Module = D.wrap(raw, info, tc.parallel, self.device)
        if _flag(tc.compile, self.device.type == "cuda"):
            if self.device.type == "cpu":
                from nanoforge.model import gemm

                gemm.use_onednn()  # decided before tracing: the compiled graph keeps the choice
            model = torch.compile(model)
        self.model = model
        self.autocast = _autocast_dtype(tc.dtype, self.device, resume_meta, info)
        self.optimizer = build_optimizer(model, tc, self.device.type, bf16=self.autocast == torch.bfloat16)

        self.loader = self.data.loader(self.cfg, info, self.device)
        start_step = 0
        if resume_meta is not None:
            start_step = resume_meta["step"]
            optim_state = ckpt.load_optimizer_state(self.ckpt_dir, start_step)
            D.load_optimizer_state(model, self.optimizer, optim_state, tc.parallel, info)
            self.loader.load_state_dict(resume_meta["loader"][info.rank])
            _set_rng(resume_meta["rng"][info.rank])
        self.flops_per_token = mc.flops_per_token(tc.seq_len)
        from nanoforge.train.mfu import peak_flops

        self.peak = peak_flops(self.device, self.autocast)
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            home.atomic_write_text(self.run_dir / "config.toml", self.cfg.to_toml())
            _truncate_metrics(self.run_dir / "metrics.jsonl", start_step)
            trained = "" if not tc.trainable else \
                f" ({sum(p.numel() for p in raw.parameters() if p.requires_grad):,} trained: {', '.join(tc.trainable)})"
            progress.log(f"{mc.num_params():,} parameters{trained}, {self.max_steps} steps × {tc.total_batch_tokens:,} tokens "
                         f"({self.accum} micro-steps × {info.world_size} processes), {tc.optimizer}, device "
                         f"{self.device}{', bf16 autocast' if self.autocast == torch.bfloat16 else ''}"
                         f"{f', resuming at step {start_step}' if start_step else ''}")
        return self._loop(start_step, resume_meta)

    def _check_resume(self, mc: Any) -> dict[str, Any] | None:
        existing = ckpt.checkpoint_steps(self.ckpt_dir)
        if not self.resume:
            if existing:
                raise UserError(f"checkpoints for tag '{self.tag}' already exist in {self.ckpt_dir}; "
                                f"continue them with --resume or pick another --tag")
            return None
        if not existing:
            raise UserError(f"--resume: no checkpoint for tag '{self.tag}' in {self.ckpt_dir}")
        meta = ckpt.check_complete(self.ckpt_dir, existing[-1])
        tok_fp = (meta.get("tokenizer") or {}).get("fingerprint")
        if tok_fp and tok_fp != self.tokenizer.fingerprint:
            raise UserError(f"{self.data.describe()} come from a different tokenizer ({self.tokenizer.fingerprint}) "
                            f"than checkpoint {self.ckpt_dir} ({tok_fp}); resume with the data it was trained on")
        old = meta.get("model_config", {})
        changed = [f"model.{k} {old.get(k)} -> {v}" for k, v in mc.to_dict().items() if old.get(k) != v]
        if changed:
            raise UserError(f"cannot resume {self.ckpt_dir} with a changed model shape ({', '.join(changed)}); "
                            f"drop those settings or start a new --tag")
        if len(meta.get("loader", [])) != self.info.world_size:
            raise UserError(f"checkpoint {self.ckpt_dir} was written by {len(meta.get('loader', []))} processes; "
                            f"resume it with the same number (now {self.info.world_size})")
        return meta

    # --- the loop -----------------------------------------------------------------------------------
    def _loop(self, start_step: int, resume_meta: dict[str, Any] | None) -> dict[str, Any]:
        tc, info, model, opt = self.tc, self.info, self.model, self.optimizer
        batches = iter(self.loader)
        step_batches = getattr(self.data, "step_batches", None)
        loss_fn = getattr(self.data, "micro_loss", None)
        tokens_per_step = tc.total_batch_tokens
        resumed = resume_meta or {}
        last: dict[str, Any] = {"loss": resumed.get("loss"), "val_bpb": resumed.get("val_bpb"),
                                "tokens_per_second": None, "mfu": None,
                                "skipped_steps": int(resumed.get("skipped_steps", 0)),
                                "val": dict(resumed.get("val") or {})}
        writers = _Writers(self.run_dir, tc, info.is_main)
        bar = progress.bar(total=self.max_steps, initial=start_step, desc=f"train {self.tag}", unit="step")
        ckpt_path: Path | None = None
        step = start_step
        interrupted: int | None = None
        t_window, tok_window = time.perf_counter(), 0
        with _Interrupt() as stop:
            while step < self.max_steps:
                t0 = time.perf_counter()
                lr = set_lr(opt, lr_multiplier(step, self.max_steps, schedule=tc.schedule, warmup_steps=tc.warmup_steps,
                                               min_lr_frac=tc.min_lr_frac, cooldown_frac=tc.cooldown_frac))
                if step_batches is not None:  # the data source makes the step's batches (RL: rollouts)
                    micro = step_batches(step, self.loader, model)
                else:
                    micro = [next(batches) for _ in range(self.accum)]
                loss_sum, learned = accumulate_gradients(model, micro, info=info, parallel=tc.parallel,
                                                         autocast=self.autocast, loss_fn=loss_fn)
                if learned:
                    if tc.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                    opt.step()
                else:
                    last["skipped_steps"] += 1
                opt.zero_grad(set_to_none=True)
                step += 1
                loss_value = D.all_mean(loss_sum, info).item() if learned else None
                dt = time.perf_counter() - t0
                tok_window += tokens_per_step
                elapsed = time.perf_counter() - t_window
                tps = tok_window / elapsed if elapsed > 0 else float("nan")
                if elapsed > 10:  # a sliding-ish window: recent speed, not the start-up
                    t_window, tok_window = time.perf_counter(), 0
                mfu = (self.flops_per_token * tps / (self.peak * info.world_size)) if self.peak else None
                if loss_value is not None and not math.isfinite(loss_value):
                    raise UserError(f"loss is {loss_value} at step {step}: lower train.lr or check the data")
                record: dict[str, Any] = {"step": step, "loss": None if loss_value is None else round(loss_value, 6),
                                          "lr": lr, "tokens": step * tokens_per_step, "learned_tokens": learned,
                                          "tokens_per_second": round(tps, 1),
                                          "mfu": None if mfu is None else round(mfu, 5), "step_time": round(dt, 4)}
                if hasattr(self.data, "step_metrics"):
                    record.update(self.data.step_metrics())
                if not learned:
                    record["skipped"] = True
                    if info.is_main:
                        progress.warn(f"step {step}: no learned token in the batch (all targets masked); skipped")
                last.update(tokens_per_second=tps, mfu=mfu)
                if loss_value is not None:
                    last["loss"] = loss_value
                is_last = step == self.max_steps
                evaluated = (tc.eval_every and step % tc.eval_every == 0) or is_last
                if evaluated:
                    scores = self.data.evaluate(self.model, self.cfg, info, self.device, self.autocast)
                    record.update(scores)
                    last["val"] = scores
                    last["val_bpb"] = scores.get("val_bpb")
                # Under FSDP the parameters are shards: rank 0 alone cannot run the model, so no samples.
                if tc.sample_every and (step % tc.sample_every == 0 or is_last) and info.is_main \
                        and not (info.enabled and tc.parallel == "fsdp"):
                    writers.samples(step, self.data.sample(self.raw, self.cfg))
                if step % max(1, tc.log_every) == 0 or is_last or evaluated:
                    writers.metrics(record)
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}" if last["loss"] is not None else "n/a", tok_s=f"{tps:,.0f}",
                                mfu=f"{100 * mfu:.1f}%" if mfu is not None else "n/a",
                                **({"bpb": f"{last['val_bpb']:.4f}"} if last["val_bpb"] is not None else {}))
                if "val_bpb" in record and info.is_main:
                    extra = "".join(f", {k.replace('_', ' ')} {v:.4f}" for k, v in last["val"].items()
                                    if k != "val_bpb" and isinstance(v, float))
                    progress.log(f"step {step}/{self.max_steps}: loss {last['loss'] or float('nan'):.4f}, "
                                 f"val bpb {record['val_bpb']:.4f}{extra}")
                elif evaluated and info.is_main and last["val"]:  # no bpb (RL): its own scores
                    progress.log(f"step {step}/{self.max_steps}: " + ", ".join(
                        f"{k} {v:.4f}" for k, v in {**self.data.step_metrics(), **last["val"]}.items()
                        if isinstance(v, float)))
                stopping = D.any_rank(stop.signum is not None, info, self.device)
                if stopping or is_last or (tc.save_every and step % tc.save_every == 0):
                    ckpt_path = self._save(step, last)
                if stopping:
                    interrupted = stop.signum or signal.SIGINT
                    if info.is_main:
                        progress.log(f"interrupted: checkpoint at step {step} in {self.ckpt_dir}; "
                                     f"continue with --resume")
                    break
        bar.close()
        writers.close()
        if ckpt_path is None and info.is_main:
            existing = ckpt.checkpoint_steps(self.ckpt_dir)
            ckpt_path = self.ckpt_dir / f"model_{existing[-1]:06d}.safetensors" if existing else None
        return {"step": step, "max_steps": self.max_steps, "loss": last["loss"], "val_bpb": last["val_bpb"],
                **{k: v for k, v in last["val"].items() if k != "val_bpb"},
                "tokens_per_second": last["tokens_per_second"], "mfu": last["mfu"],
                "skipped_steps": last["skipped_steps"],
                "checkpoint": str(ckpt_path) if ckpt_path else None, "checkpoint_dir": str(self.ckpt_dir),
                "metrics": str(self.run_dir / "metrics.jsonl"), "run_dir": str(self.run_dir),
                "interrupted": interrupted, "num_params": self.raw.config.num_params(), "rank": info.rank,
                "already_complete": start_step >= self.max_steps}

    def _save(self, step: int, last: dict[str, Any]) -> Path | None:
        info = self.info
        model_state, optim_state = D.full_state_dicts(self.model, self.optimizer, self.tc.parallel, info)
        loaders = D.gather_objects(self.loader.state_dict(), info)
        rngs = D.gather_objects(_get_rng(), info)
        if not info.is_main:
            return None
        model_state = {k.replace("_orig_mod.", ""): v for k, v in model_state.items()}
        meta = {"phase": self.phase, "tag": self.tag, "run": self.run_name, "step": step,
                "model_config": self.raw.config.to_dict(), "config": self.cfg.to_dict(),
                "tokenizer": {"path": str(getattr(self.tokenizer, "path", "")),
                              "name": getattr(self.tokenizer, "name", None),
                              "fingerprint": self.tokenizer.fingerprint},
                **self.data.meta(),
                "loss": last["loss"], "val_bpb": last["val_bpb"], "val": last["val"],
                "skipped_steps": last["skipped_steps"], "world_size": info.world_size,
                "parallel": self.tc.parallel if info.enabled else None,
                "autocast": "bfloat16" if self.autocast == torch.bfloat16 else "float32",
                "loader": loaders, "rng": rngs, "torch": torch.__version__, "time": time.time()}
        path = ckpt.save_checkpoint(self.ckpt_dir, step, model_state, optim_state, meta)
        ckpt.prune_checkpoints(self.ckpt_dir, keep_last=max(1, self.tc.keep_last))
        return path


class _Writers:
    """metrics.jsonl and samples.jsonl (rank 0), plus TensorBoard / wandb when asked for and installed."""

    def __init__(self, run_dir: Path, tc: Any, main: bool) -> None:
        self.main, self.run_dir = main, run_dir
        self.tb = self.wandb = None
        if not main:
            return
        if tc.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                progress.warn("train.tensorboard = true but tensorboard is not installed; skipping it")
        if tc.wandb:
            try:
                import wandb

                self.wandb = wandb.init(project=tc.wandb, name=run_dir.name, dir=str(run_dir))
            except ImportError:
                progress.warn("train.wandb is set but wandb is not installed; skipping it")

    def metrics(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb is not None:
            self.wandb.log(numbers, step=record["step"])

    def samples(self, step: int, samples: list[dict[str, str]]) -> None:
        with open(self.run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps({"step": step, **s}, ensure_ascii=False) + "\n")
                progress.log(f"sample @ {step}: {s['prompt']!r} -> {s['completion']!r}")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop lines past the checkpoint's step so metrics.jsonl reads as one uninterrupted run."""
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
            and json.loads(line).get("step", 0) <= step]
    home.atomic_write_text(path, "".join(line + "\n" for line in keep))


def _as_config(config: RunConfig | dict[str, Any] | str) -> RunConfig:
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, str):
        return load_config(preset=config)
    return RunConfig.from_dict(config)


def _device(name: str) -> torch.device:
    return D.parse_device(name, "train.device")


def _autocast_dtype(dtype: str, device: torch.device, resume_meta: dict[str, Any] | None = None,
                    info: D.DistInfo | None = None) -> torch.dtype | None:
    """bf16 autocast (fp32 weights and optimizer state) or None (fp32). `auto`: bf16 on CUDA, and on a CPU
    whose bf16 products were measured clearly faster (gemm.bf16_faster); a resumed run keeps the choice its
    checkpoint recorded, so that it does the same arithmetic on a machine that measures differently; under
    torchrun every rank takes rank 0's measurement."""
    if dtype == "bfloat16":
        return torch.bfloat16
    if dtype != "auto":
        return None
    if resume_meta is not None and "autocast" in resume_meta:
        return torch.bfloat16 if resume_meta["autocast"] == "bfloat16" else None
    if device.type == "cuda":
        return torch.bfloat16
    if device.type != "cpu":
        return None
    from nanoforge.model import gemm

    choice = gemm.bf16_faster() if info is None or info.is_main else False
    if info is not None and info.enabled:
        flag = torch.tensor([int(choice)])
        torch.distributed.broadcast(flag, src=0)
        choice = bool(flag.item())
    return torch.bfloat16 if choice else None


def _flag(value: str, auto: bool) -> bool:
    return auto if value == "auto" else value == "true"


def _get_rng() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": _b64(torch.get_rng_state()), "python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), pos, has_gauss, cached]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def _set_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(state["cuda"]))


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
