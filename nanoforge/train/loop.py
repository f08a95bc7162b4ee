"""The one training loop (base pretraining now; the chat stages reuse it with other data and schedules).

    nanoforge train base --preset cpu-demo --tokens de4k --tag demo
    torchrun --nproc_per_node=2 -m nanoforge train base --preset ci --tokens de512 --tag ddp

Per optimizer step: `accum` micro-batches (derived from train.total_batch_tokens), gradient clipping,
AdamW or Muon, the lr schedule. Every eval_every steps: validation bits per byte; every sample_every
steps: the eval.prompts sampled greedily; metrics to runs/<run>/metrics.jsonl. SIGINT/SIGTERM finish the
current step, write a checkpoint and return (`interrupted` in the summary); `resume=True` continues the
latest checkpoint of the tag exactly (weights, optimizer, loader position, RNG, step).
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
from nanoforge.train.optim import build_optimizer, lr_multiplier, set_lr

RUN_OWNER = "train.json"  # runs/<run>/train.json: {"phase", "tag"} of the training that writes the run


def train(config: RunConfig | dict[str, Any] | str, *, tokens: str, tag: str, run: str | None = None,
          phase: str = "base", resume: bool = False, own_run: bool = False) -> dict[str, Any]:
    """Train per `config` (a RunConfig, its dict, or a preset name) on token shards `tokens` (a name under
    tokens/ or a path); checkpoints go to checkpoints/<phase>/<tag>/. Returns a summary dict: step, loss,
    val_bpb, tokens_per_second, mfu, checkpoint, metrics, run_dir, interrupted.
    Holds the locks of the tag and of the run folder while it trains. A run folder belongs to one training:
    one that another tag wrote metrics to is refused (`own_run=True`: the caller owns it, as a speedrun
    does its own, and the training's metrics replace the old ones).
    Refuses (UserError): an invalid tag or run name, a tag or run folder in use by another process,
    missing shards, a batch that does not divide into micro-batches, an existing tag without resume, and on
    resume a different tokenizer, model shape or number of processes, or a run that is already complete."""
    cfg = _as_config(config)
    tc = cfg.train
    device = _device(tc.device)
    info = D.setup(device.type)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    try:
        trainer = _Trainer(cfg, tokens=tokens, tag=tag, run=run, phase=phase, resume=resume, device=device,
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


class _Trainer:
    def __init__(self, cfg: RunConfig, *, tokens: str, tag: str, run: str | None, phase: str, resume: bool,
                 device: torch.device, info: D.DistInfo, own_run: bool = False) -> None:
        self.cfg, self.tc, self.info, self.device = cfg, cfg.train, info, device
        self.phase, self.tag, self.resume, self.own_run = phase, tag, resume, own_run
        self.run_name = run or f"{phase}-{tag}"
        self.tokens_dir = home.resolve(tokens, "tokens")
        self.tokens_name = str(tokens)
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
        meta = self._tokens_meta()
        self.tokenizer = self._tokenizer(meta)
        mc = self.cfg.model_config()
        if mc.vocab_size != int(meta["vocab_size"]):
            progress.log(f"model.vocab_size {mc.vocab_size} -> {meta['vocab_size']} (the tokenizer's)")
            self.cfg.model.vocab_size = int(meta["vocab_size"])
            mc = self.cfg.model_config()
        micro_tokens = tc.device_batch_size * tc.seq_len * info.world_size
        if tc.total_batch_tokens % micro_tokens:
            raise UserError(
                f"train.total_batch_tokens={tc.total_batch_tokens} is not a multiple of device_batch_size × "
                f"seq_len × processes = {tc.device_batch_size} × {tc.seq_len} × {info.world_size} = {micro_tokens}; "
                f"set train.total_batch_tokens to a multiple of {micro_tokens}")
        self.accum = tc.total_batch_tokens // micro_tokens
        self.max_steps = tc.max_steps or math.ceil(tc.token_ratio * mc.num_params() / tc.total_batch_tokens)

        resume_meta = self._check_resume(mc)
        torch.manual_seed(tc.seed)
        from nanoforge.model import LLaMA

        raw = LLaMA(mc)
        if resume_meta is not None:
            ckpt.load_weights(raw, ckpt.load_state_dict(self.ckpt_dir, resume_meta["step"]),
                              where=f"{self.ckpt_dir} step {resume_meta['step']}")
        raw.to(self.device)
        self.raw = raw
        model: torch.nn.Module = D.wrap(raw, info, tc.parallel, self.device)
        if _flag(tc.compile, self.device.type == "cuda"):
            if self.device.type == "cpu":
                from nanoforge.model import gemm

                gemm.use_onednn()  # decided before tracing: the compiled graph keeps the choice
            model = torch.compile(model)
        self.model = model
        self.optimizer = build_optimizer(model, tc, self.device.type)
        self.autocast = _autocast_dtype(tc.dtype, self.device)

        from nanoforge.data.loader import TokenLoader

        self.loader = TokenLoader(self.tokens_dir, split="train", batch_size=tc.device_batch_size,
                                  seq_len=tc.seq_len, layout=self.cfg.data.layout, rank=info.rank,
                                  world_size=info.world_size, seed=tc.seed, device=str(self.device), infinite=True)
        start_step = 0
        if resume_meta is not None:
            start_step = resume_meta["step"]
            optim_state = ckpt.load_optimizer_state(self.ckpt_dir, start_step)
            D.load_optimizer_state(model, self.optimizer, optim_state, tc.parallel, info)
            self.loader.load_state_dict(resume_meta["loader"][info.rank])
            _set_rng(resume_meta["rng"][info.rank])
        self.flops_per_token = mc.flops_per_token(tc.seq_len)
        from nanoforge.train.mfu import peak_flops

        self.peak = peak_flops(self.device)
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            home.atomic_write_text(self.run_dir / "config.toml", self.cfg.to_toml())
            _truncate_metrics(self.run_dir / "metrics.jsonl", start_step)
            progress.log(f"{mc.num_params():,} parameters, {self.max_steps} steps × {tc.total_batch_tokens:,} tokens "
                         f"({self.accum} micro-steps × {info.world_size} processes), {tc.optimizer}, device "
                         f"{self.device}{f', resuming at step {start_step}' if start_step else ''}")
        return self._loop(start_step, resume_meta)

    def _tokens_meta(self) -> dict[str, Any]:
        if not (self.tokens_dir / "meta.json").exists():
            raise UserError(f"token shards {self.tokens_dir} not found (make them with `nanoforge data tokenize`)")
        meta = home.read_json(self.tokens_dir / "meta.json", "token shards meta")
        if "vocab_size" not in meta:
            raise UserError(f"token shards meta {self.tokens_dir / 'meta.json'} has no vocab_size")
        return meta

    def _tokenizer(self, meta: dict[str, Any]) -> Any:
        """The tokenizer the shards were made with (for token_bytes and samples), or None if not found."""
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
            raise UserError(f"token shards {self.tokens_dir} come from a different tokenizer ({self.tokenizer.fingerprint}) "
                            f"than checkpoint {self.ckpt_dir} ({tok_fp}); resume with the shards it was trained on")
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
        tokens_per_step = tc.total_batch_tokens
        last: dict[str, Any] = {"loss": (resume_meta or {}).get("loss"), "val_bpb": (resume_meta or {}).get("val_bpb"),
                                "tokens_per_second": None, "mfu": None}
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
                loss_sum = torch.zeros((), device=self.device)
                for micro in range(self.accum):
                    inputs, targets, mask = next(batches)
                    sync = (model.no_sync() if info.enabled and tc.parallel == "ddp" and micro < self.accum - 1
                            else contextlib.nullcontext())
                    with sync:
                        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                            loss = model(inputs, targets, mask) / self.accum
                        loss.backward()
                    loss_sum += loss.detach()
                if tc.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                loss_value = D.all_mean(loss_sum, info).item()
                dt = time.perf_counter() - t0
                tok_window += tokens_per_step
                elapsed = time.perf_counter() - t_window
                tps = tok_window / elapsed if elapsed > 0 else float("nan")
                if elapsed > 10:  # a sliding-ish window: recent speed, not the start-up
                    t_window, tok_window = time.perf_counter(), 0
                mfu = (self.flops_per_token * tps / (self.peak * info.world_size)) if self.peak else None
                if not math.isfinite(loss_value):
                    raise UserError(f"loss is {loss_value} at step {step}: lower train.lr or check the data")
                record: dict[str, Any] = {"step": step, "loss": round(loss_value, 6), "lr": lr,
                                          "tokens": step * tokens_per_step, "tokens_per_second": round(tps, 1),
                                          "mfu": None if mfu is None else round(mfu, 5), "step_time": round(dt, 4)}
                last.update(loss=loss_value, tokens_per_second=tps, mfu=mfu)
                is_last = step == self.max_steps
                if (tc.eval_every and step % tc.eval_every == 0) or is_last:
                    last["val_bpb"] = record["val_bpb"] = self._evaluate()
                # Under FSDP the parameters are shards: rank 0 alone cannot run the model, so no samples.
                if tc.sample_every and (step % tc.sample_every == 0 or is_last) and info.is_main \
                        and not (info.enabled and tc.parallel == "fsdp"):
                    writers.samples(step, self._sample())
                if step % max(1, tc.log_every) == 0 or is_last or "val_bpb" in record:
                    writers.metrics(record)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tps:,.0f}",
                                mfu=f"{100 * mfu:.1f}%" if mfu is not None else "n/a",
                                **({"bpb": f"{last['val_bpb']:.4f}"} if last["val_bpb"] is not None else {}))
                if "val_bpb" in record and info.is_main:
                    progress.log(f"step {step}/{self.max_steps}: loss {loss_value:.4f}, val bpb {record['val_bpb']:.4f}")
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
                "tokens_per_second": last["tokens_per_second"], "mfu": last["mfu"],
                "checkpoint": str(ckpt_path) if ckpt_path else None, "checkpoint_dir": str(self.ckpt_dir),
                "metrics": str(self.run_dir / "metrics.jsonl"), "run_dir": str(self.run_dir),
                "interrupted": interrupted, "num_params": self.raw.config.num_params(), "rank": info.rank,
                "already_complete": start_step >= self.max_steps}

    def _evaluate(self) -> float:
        from nanoforge.eval.bpb import evaluate_bpb

        tc = self.tc
        result = evaluate_bpb(self.model, self.tokens_dir, self.tokenizer.token_bytes, batch_size=tc.device_batch_size,
                              seq_len=tc.seq_len, device=self.device, max_batches=tc.eval_batches or None,
                              layout=self.cfg.data.layout, rank=self.info.rank, world_size=self.info.world_size,
                              autocast_dtype=self.autocast)
        return round(result["val_bpb"], 6)

    def _sample(self) -> list[dict[str, str]]:
        from nanoforge.infer.engine import generate

        prompts, n = self.cfg.eval.prompts, self.cfg.eval.max_new_tokens
        return [{"prompt": p, "completion": generate(self.raw, self.tokenizer, p, max_new_tokens=n)}
                for p in prompts]

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
                "tokens": self.tokens_name, "tokens_path": str(self.tokens_dir),
                "loss": last["loss"], "val_bpb": last["val_bpb"], "world_size": info.world_size,
                "parallel": self.tc.parallel if info.enabled else None,
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
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"train.device '{name}' is not a device (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is cuda but this PyTorch build sees no CUDA GPU; use train.device=auto")
    return device


def _autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


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
