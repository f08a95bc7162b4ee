"""Mid-training and supervised fine-tuning: the one training loop (train/loop.py) on conversations.

    nanoforge train sft --from demo --data chat.jsonl --tag demo
    summary = train_sft("checkpoints/base/demo", "chat.jsonl", tag="demo")

The model, its tokenizer and the run settings (batch, device, optimizer) come from the --from checkpoint;
the phase defaults (nanoforge/presets/phases/sft.toml or mid.toml: a linear decay over one pass of the
data, sft.lr_scale of the base learning rates) go on top, then --config and --set. Training starts from
the checkpoint's weights with a fresh optimizer. Every conversation is rendered by
`Tokenizer.render_conversation`, truncated at render time to a row (train.seq_len + 1 tokens), and the
rows are packed best-fit (data/chat_loader.py); the loss covers the tokens whose mask is 1 (`sft.learn =
"all"`: every token, for mid-training). Validation: loss and bits per byte on the held-out conversations'
learned tokens (a val/ split beside train/, --val, or sft.val_conversations held out of --data).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanoforge import checkpoint as ckpt
from nanoforge import dist as D
from nanoforge import home, progress
from nanoforge.config import PRESETS_DIR, RunConfig, apply_layers, validate
from nanoforge.errors import UserError

PHASE_SOURCES = {"sft": ("base", "mid"), "mid": ("base",)}
ASSISTANT_END = "<|assistant_end|>"


def train_sft(from_checkpoint: str | Path, data: str | Path, *, tag: str, phase: str = "sft",
              val: str | Path | None = None, config: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
              run: str | None = None, resume: bool = False, own_run: bool = False) -> dict[str, Any]:
    """Fine-tune the checkpoint `from_checkpoint` (a base checkpoint, or a mid one for sft) on the
    conversations of `data` (a file, a mixture TOML, a folder with train/ and val/ splits, or "default": the
    offline default chat data, built on first use); checkpoints go
    to checkpoints/<phase>/<tag>/. Returns the loop's summary plus `conversations`, `truncated`, `dropped`,
    `val_loss`, `val_bpb` (held-out), `base_val_loss`/`base_val_bpb` (the --from model on the same held-out
    conversations, before training) and `from`.
    Refuses (UserError): a --from that is not a base (or mid) checkpoint or whose tokenizer is missing,
    changed or has no chat tokens; model.* settings; data where no conversation keeps a learned token
    within a row."""
    if phase not in PHASE_SOURCES:
        raise UserError(f"phase must be one of {', '.join(PHASE_SOURCES)}, got {phase!r}")
    folder, step, meta = ckpt.load_meta(from_checkpoint)
    source_phase = meta.get("phase", "base")
    if source_phase not in PHASE_SOURCES[phase]:
        raise UserError(f"--from {from_checkpoint} is a checkpoint of phase {source_phase}; train {phase} starts "
                        f"from a {' or '.join(PHASE_SOURCES[phase])} checkpoint")
    tokenizer = checkpoint_tokenizer(meta, f"{folder}")
    if str(data) == "default":
        from nanoforge.data.chat import default_chat_data

        data = default_chat_data()
    cfg = phase_config(meta, phase, config=config, overrides=overrides)
    chat = ChatData(tokenizer, data, val=val, base=(folder, step, meta), sft=cfg.sft, seq_len=cfg.train.seq_len,
                    seed=cfg.train.seed)
    from nanoforge.train.loop import _device, train

    existing = ckpt.checkpoint_steps(home.checkpoint_dir(phase, tag))
    if resume and existing:
        chat.base_scores = dict(home.read_json(home.checkpoint_dir(phase, tag) / f"meta_{existing[-1]:06d}.json",
                                               "checkpoint meta").get("base_val") or {})
    elif chat.val_rows and not existing and int(os.environ.get("RANK", "0")) == 0:  # rank 0 reports it
        device = _device(cfg.train.device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        base_model, _ = ckpt.load_model(folder, step=step, device=device)
        chat.base_scores = evaluate_chat_loss(base_model, chat.val_rows, tokenizer,
                                              batch_size=cfg.train.device_batch_size, seq_len=cfg.train.seq_len,
                                              device=next(base_model.parameters()).device,
                                              max_batches=cfg.train.eval_batches or None, pad_id=chat._pad_id())
        del base_model
    summary = train(cfg, data=chat, tag=tag, run=run, phase=phase, resume=resume, own_run=own_run)
    summary.update(chat.summary())
    return summary


def checkpoint_tokenizer(meta: dict[str, Any], where: str) -> Any:
    """The tokenizer a checkpoint was trained with (its meta names it), checked by fingerprint and for the
    chat tokens; UserError otherwise."""
    from nanoforge.tokenizer import Tokenizer

    info = meta.get("tokenizer") or {}
    tokenizer = None
    for c in (info.get("path"), info.get("name")):
        if c:
            try:
                tokenizer = Tokenizer.load(c)
                break
            except UserError:
                continue
    if tokenizer is None:
        raise UserError(f"cannot find the tokenizer of checkpoint {where} (its meta names "
                        f"{[c for c in (info.get('path'), info.get('name')) if c] or 'none'})")
    fp = info.get("fingerprint")
    if fp and tokenizer.fingerprint != fp:
        raise UserError(f"tokenizer {tokenizer.name} (fingerprint {tokenizer.fingerprint}) is not the one checkpoint "
                        f"{where} was trained with ({fp})")
    try:
        tokenizer.special_id(ASSISTANT_END)
    except (UserError, KeyError, ValueError):
        raise UserError(f"tokenizer {tokenizer.name} of checkpoint {where} has no chat tokens ({ASSISTANT_END}); "
                        f"chat training needs a tokenizer with the chat special tokens") from None
    return tokenizer


SCALED_LRS = ("lr", "embedding_lr", "norm_lr", "muon_lr")  # the checkpoint's rates that <section>.lr_scale scales
# A phase section's key that, when set (non-zero, non-empty), sets train.<key> for that phase; a section
# without the key leaves train.<key> the checkpoint's.
PHASE_TRAIN_KEYS = ("eval_every", "norm_lr", "trainable", "optimizer")


def phase_config(meta: dict[str, Any], phase: str, *, config: str | Path | None = None,
                 overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The checkpoint's resolved config ← presets/phases/<phase>.toml ← `config` ← `overrides`, for phase
    mid, sft (section [sft]) or rl (section [rl]): the checkpoint's learning rates scaled by the section's
    lr_scale unless train.*lr is set explicitly, and the section's PHASE_TRAIN_KEYS (when set) as
    train.* (so a preset's [sft] or [rl], all the speedrun passes on, can hold them). model.* stays the
    checkpoint's (UserError if set)."""
    layers: list[tuple[str | Path, str]] = [(PRESETS_DIR / "phases" / f"{phase}.toml", f"{phase} defaults")]
    if config:
        layers.append((config, f"config {config}"))
    overrides = list(overrides)
    base = RunConfig.from_dict(meta.get("config") or {})
    # The model is the checkpoint's, whatever its run config says (an imported checkpoint has none of its own).
    for key, value in meta["model_config"].items():
        if hasattr(base.model, key):
            setattr(base.model, key, value)
    base.model.depth = 0
    probe = RunConfig.from_dict(base.to_dict())
    touched = apply_layers(probe, layers, overrides)
    model_keys = sorted(k for s, k in touched if s == "model")
    if model_keys:
        raise UserError(f"the model comes from the --from checkpoint; model.{model_keys[0]} cannot be set for {phase}")
    section = "rl" if phase == "rl" else "sft"
    cfg = RunConfig.from_dict(base.to_dict())
    scale = getattr(probe, section).lr_scale
    for key in SCALED_LRS:
        setattr(cfg.train, key, getattr(cfg.train, key) * scale)
    cfg.train.trainable = []  # each phase trains all parameters unless its own settings say otherwise
    apply_layers(cfg, layers, overrides)
    validate(cfg)  # a bad [sft]/[rl] key is named as the user wrote it, before it is copied into train.*
    for key in PHASE_TRAIN_KEYS:
        value = getattr(getattr(cfg, section), key, 0)
        if value:
            setattr(cfg.train, key, value)
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, base.model.max_seq_len)
    validate(cfg)
    return cfg


def render_all(tokenizer: Any, conversations: list[Any], *, max_tokens: int, learn: str = "assistant"
               ) -> tuple[list[tuple[list[int], list[int]]], dict[str, int]]:
    """Render conversations for training: (ids, mask) pairs of at most `max_tokens` tokens, and counts
    {conversations, truncated, dropped}. A conversation without a learned target (mask 1 after the first
    token) within `max_tokens` is dropped. learn="all" learns every token after the first."""
    out: list[tuple[list[int], list[int]]] = []
    truncated = dropped = 0
    for conv in progress.bar(conversations, desc="render", unit="conv", total=len(conversations)):
        rendered = tokenizer.render_conversation(conv, max_tokens=max_tokens)
        ids, mask = rendered
        ids, mask = list(ids), list(mask)
        truncated += bool(getattr(rendered, "truncated", False))
        if learn == "all":
            mask = [0] + [1] * (len(ids) - 1)
        if not any(mask[1:]):
            dropped += 1
            continue
        out.append((ids, mask))
    return out, {"conversations": len(conversations), "truncated": truncated, "dropped": dropped}


def load_chat(data: str | Path | list[Any]) -> list[Any]:
    """Conversations of a file, folder or mixture TOML (nanoforge.data.chat), or a list given as is."""
    if isinstance(data, list):
        return data
    from nanoforge.data.chat import load_conversations

    return list(load_conversations(data))


class ChatData:
    """Conversations for the training loop (the data-source interface of train/loop.py's TokenData)."""

    kind = "chat data"

    def __init__(self, tokenizer: Any, data: str | Path, *, val: str | Path | None, base: tuple[Path, int, dict],
                 sft: Any, seq_len: int, seed: int) -> None:
        self.tokenizer, self.sft, self.seq_len, self.seed = tokenizer, sft, seq_len, seed
        self.data = f"{len(data)} conversations" if isinstance(data, list) else str(data)
        self.base_folder, self.base_step, self.base_meta = base
        train_src: Any = data
        self.val_source: str | None = None if val is None else str(val) if not isinstance(val, list) else "given"
        path = None if isinstance(data, list) else Path(data)
        if val is None and path is not None and path.is_dir() and (path / "train").is_dir():
            # the layout of the default chat data: train/ (mixed by train.toml when present) and val/
            train_src = path / "train.toml" if (path / "train.toml").is_file() else path / "train"
            if (path / "val").is_dir():
                self.val_source = str(path / "val")
        train_convs = load_chat(train_src)
        loaded = len(train_convs)
        val_convs = load_chat(val if val is not None else self.val_source) if self.val_source else []
        if not self.val_source and sft.val_conversations and len(train_convs) > 1:
            k = min(sft.val_conversations, len(train_convs) // 10 or 1)
            held = set(np.random.default_rng([seed, 7]).permutation(len(train_convs))[:k].tolist())
            val_convs = [c for i, c in enumerate(train_convs) if i in held]
            train_convs = [c for i, c in enumerate(train_convs) if i not in held]
            self.val_source = f"{k} conversations held out of {self.data}"
        self.train_rows, self.counts = render_all(tokenizer, train_convs, max_tokens=seq_len + 1, learn=sft.learn)
        if not self.train_rows:
            c = self.counts
            why = (f"every conversation is longer than a row of train.seq_len + 1 = {seq_len + 1} tokens before "
                   f"its first learned token" if c["truncated"] >= c["conversations"] else
                   "no conversation has an assistant token to learn")
            raise UserError(f"chat data {self.data}: {why} ({loaded} conversations); "
                            f"{'raise train.seq_len or shorten them' if c['truncated'] else 'check the data'}")
        self.val_rows, self.val_counts = render_all(tokenizer, val_convs, max_tokens=seq_len + 1, learn=sft.learn)
        self.base_scores: dict[str, float] = {}
        self._val_prompts = val_convs[:3]

    # --- the data-source interface -----------------------------------------------------------------
    def prepare(self, cfg: RunConfig) -> None:
        """Nothing to find: the tokenizer and conversations were loaded in __init__."""

    def describe(self) -> str:
        return f"chat data {self.data}"

    def init_weights(self, model: torch.nn.Module) -> None:
        ckpt.load_weights(model, ckpt.load_state_dict(self.base_folder, self.base_step),
                          where=f"{self.base_folder} step {self.base_step}")

    def default_steps(self, cfg: RunConfig, world_size: int) -> int:
        from nanoforge.data.chat_loader import pack_rows

        order = np.random.default_rng([cfg.train.seed, 0]).permutation(len(self.train_rows))
        rows = len(pack_rows([len(self.train_rows[i][0]) for i in order], self.seq_len + 1, self.sft.buffer_size))
        return max(1, math.ceil(self.sft.epochs * rows * cfg.train.seq_len / cfg.train.total_batch_tokens))

    def loader(self, cfg: RunConfig, info: D.DistInfo, device: torch.device) -> Any:
        from nanoforge.data.chat_loader import ChatLoader

        return ChatLoader(self.train_rows, batch_size=cfg.train.device_batch_size, seq_len=cfg.train.seq_len,
                          pad_id=self._pad_id(), rank=info.rank, world_size=info.world_size, seed=cfg.train.seed,
                          device=device, infinite=True, buffer_size=self.sft.buffer_size)

    def evaluate(self, model: torch.nn.Module, cfg: RunConfig, info: D.DistInfo, device: torch.device,
                 autocast: torch.dtype | None) -> dict[str, float]:
        if not self.val_rows:
            return {}
        return evaluate_chat_loss(model, self.val_rows, self.tokenizer, batch_size=cfg.train.device_batch_size,
                                  seq_len=cfg.train.seq_len, device=device, info=info, autocast=autocast,
                                  max_batches=cfg.train.eval_batches or None, pad_id=self._pad_id())

    def sample(self, model: torch.nn.Module, cfg: RunConfig) -> list[dict[str, str]]:
        """Greedy replies to the first held-out conversations' prompts (until <|assistant_end|>)."""
        from nanoforge.infer.engine import generate_ids

        end = self.tokenizer.special_id(ASSISTANT_END)
        out = []
        for conv in self._val_prompts:
            prompt = self.tokenizer.render_for_completion(conv)
            ids = list(generate_ids(model, prompt, max_new_tokens=cfg.eval.max_new_tokens, stop_ids=[end]))
            out.append({"prompt": self.tokenizer.decode(prompt), "completion": self.tokenizer.decode(ids)})
        return out

    def meta(self) -> dict[str, Any]:
        return {"from": {"path": str(self.base_folder), "step": self.base_step, "phase": self.base_meta.get("phase")},
                "data": str(self.data), "val_data": self.val_source, "conversations": self.counts,
                "base_val": self.base_scores}

    def summary(self) -> dict[str, Any]:
        return {**self.counts, "val_conversations": len(self.val_rows),
                **{f"base_{k}": v for k, v in self.base_scores.items()},
                "from": f"{self.base_folder} step {self.base_step}"}

    def _pad_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_id", None)
        return int(bos) if bos is not None else 0


@torch.no_grad()
def evaluate_chat_loss(model: torch.nn.Module, rows: list[tuple[list[int], list[int]]], tokenizer: Any, *,
                       batch_size: int, seq_len: int, device: torch.device | str, info: D.DistInfo | None = None,
                       autocast: torch.dtype | None = None, max_batches: int | None = None,
                       pad_id: int = 0) -> dict[str, float]:
    """One pass over rendered conversations, packed best-fit in order: {val_loss (mean nats per learned
    token), val_bpb (nats / (ln 2 × UTF-8 bytes) over learned tokens with bytes, specials excluded),
    val_tokens}. Under torch.distributed the sums cover every rank's share."""
    from nanoforge.data.chat_loader import ChatLoader

    info = info or D.DistInfo()
    device = torch.device(device)
    tb = torch.as_tensor(np.asarray(tokenizer.token_bytes), dtype=torch.int64, device=device)
    loader = ChatLoader(rows, batch_size=batch_size, seq_len=seq_len, pad_id=pad_id, rank=info.rank,
                        world_size=info.world_size, device=device, infinite=False)
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # nats, tokens, nats with bytes, bytes
    try:
        for i, (inputs, targets, mask) in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                nats, scored = model(inputs, targets, mask, reduction="none")
            scored = scored.bool()
            nbytes = tb[targets.clamp(min=0)] * scored
            with_bytes = nbytes > 0
            totals[0] += nats[scored].double().sum()
            totals[1] += scored.sum()
            totals[2] += nats[with_bytes].double().sum()
            totals[3] += nbytes.sum()
    finally:
        model.train(was_training)
    if info.enabled:
        torch.distributed.all_reduce(totals)
    nats, tokens, nats_b, nbytes = totals.tolist()
    if tokens == 0:
        raise UserError("no learned token in the held-out conversations")
    return {"val_bpb": round(nats_b / (math.log(2) * nbytes), 6) if nbytes else float("nan"),
            "val_loss": round(nats / tokens, 6), "val_tokens": int(tokens)}
