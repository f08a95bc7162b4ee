"""SFT benchmark: `nanoforge train sft` against TRL's SFTTrainer on the same model, data and batches, in the
same process, fp32 on CPU.

Setup (in a temporary $NANOFORGE_HOME): the offline default chat data, a 4,096-token tokenizer trained on
it, and a base checkpoint of the cpu-demo shape (random init). Ours: `train_sft` for --steps steps
(rows packed best-fit, loss on the assistant tokens). TRL: the exported model (`nanoforge export hf`,
LlamaForCausalLM, SDPA) trained by `SFTTrainer` on exactly the rows our loader produced, pre-tokenized with
their assistant masks (the `assistant_masks` column, from which TRL builds its -100 labels: its
assistant-only loss for tokenized data), packing on, sequential sampling, the same batch size, no
gradient accumulation. Both losses are the mean over the batch's learned tokens, so the first step's
losses must agree (within 1e-4).

TRL's settings, so that it does the work ours does and no more: fp32 (bf16=False), activation
checkpointing OFF (TRL's SFTConfig turns it on by default; `activation_checkpointing=False`; the bench
checks `model.is_activation_checkpointing`, the new name of `is_gradient_checkpointing`, at every step),
no dataloader workers, the torch threads of the process (OMP_NUM_THREADS / --threads; both sides run in
it). Its loss is its default "nll" through its fused, chunked LM head; on CPU that head scores every
position, learned or not (ours skips none either). TRL also computes each token's entropy and top-1
accuracy for its logs every step; that cannot be turned off in its config, so by default the bench re-adds
its fused head without them (`--trl-metrics` keeps them), and `--trl-checkpointing` leaves its
checkpointing on. Packing modes, each a TRL column (--trl-modes):
  wrapped: packing_strategy="wrapped": every row is exactly max_length = seq_len + 1 tokens, so each
           packed row is one of our rows, a (batch, seq_len + 1) tensor with causal attention per row,
           as ours;
  bfd:     TRL's default packing (best-fit decreasing), which forces padding-free batches: the batch is
           flattened into one sequence of batch × (seq_len + 1) tokens with positions restarting per row;
           with SDPA (no FlashAttention on CPU) transformers then builds a block-diagonal mask over the
           whole flattened sequence, so attention costs batch× the FLOPs of per-row attention.
The headline ratio is against the fastest TRL mode.

Measured: each step is timed from the end of the step before to its own end (so data loading, logging
and the optimizer are in; the first step is dropped as warm-up), wall clock and this process's CPU time.
The sides alternate --repeats times in this one process (the machine may be shared with other jobs);
every run does the same steps on the same rows, so each step counts with its fastest run; tokens/s =
batch × seq_len × timed steps / the sum of those times.

    OMP_NUM_THREADS=1 .venv/bin/python bench/sft.py --steps 10 --batch 16 --repeats 3
    .venv/bin/python bench/sft.py --steps 4 --batch 8 --repeats 1 --trl-modes wrapped
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.small_model import now  # noqa: E402

TARGET = 1.3  # ours / TRL tokens per second
MODES = ("wrapped", "bfd")


def setup(home: Path, batch: int, seq_len: int, chat_data: str | None, vocab_size: int = 4096) -> dict:
    from nanoforge import checkpoint as ckpt
    from nanoforge.config import load_config
    from nanoforge.data.chat import default_chat_data
    from nanoforge.model import LLaMA
    from nanoforge.tokenizer import Tokenizer
    from nanoforge.tokenizer.train import train_tokenizer

    data = Path(chat_data).expanduser() if chat_data else default_chat_data()
    if not (data / "train.toml").is_file():
        sys.exit(f"error: {data} is not a default chat data folder (no train.toml); leave out --chat-data to build one")
    text = []
    for f in sorted((data / "train").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            for m in json.loads(line)["messages"]:
                c = m["content"]
                text.append(c if isinstance(c, str) else "".join(p["text"] for p in c))
    (home / "text").mkdir(parents=True)
    (home / "text" / "chat.txt").write_text("\n\n".join(text), encoding="utf-8")
    tok_dir = train_tokenizer(home / "text", vocab_size=vocab_size, backend="rustbpe", out=home / "tokenizers" / "chat4k")
    tok = Tokenizer.load(tok_dir)
    cfg = load_config(preset="cpu-demo", overrides=[f"model.vocab_size={tok.vocab_size}",
                                                    f"train.device_batch_size={batch}", f"train.seq_len={seq_len}",
                                                    f"train.total_batch_tokens={batch * seq_len}",
                                                    "train.device=cpu", "train.compile=false",
                                                    "train.optimizer=adamw"])  # TRL's
    torch.manual_seed(0)
    model = LLaMA(cfg.model_config())
    meta = {"phase": "base", "tag": "bench", "model_config": cfg.model_config().to_dict(), "config": cfg.to_dict(),
            "tokenizer": {"path": str(tok_dir), "name": tok.name, "fingerprint": tok.fingerprint}}
    folder = home / "checkpoints" / "base" / "bench"
    ckpt.save_checkpoint(folder, 0, model, None, meta)
    return {"data": data / "train.toml", "tok": tok, "base": folder}


# --- ours ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def step_clock(ends: list[tuple[float, float]]) -> Iterator[None]:
    """While active, every training step of train_sft appends (wall, CPU) at its end to `ends`: the loop
    asks its data source for step_metrics right after the step's loss is read."""
    from nanoforge.train.sft import ChatData

    had = "step_metrics" in ChatData.__dict__
    old = ChatData.__dict__.get("step_metrics")

    def step_metrics(self):  # noqa: ANN001, ANN202
        ends.append(now())
        return old(self) if old else {}

    ChatData.step_metrics = step_metrics
    try:
        yield
    finally:
        if had:
            ChatData.step_metrics = old
        else:
            del ChatData.step_metrics


def run_ours(env: dict, steps: int, tag: str) -> dict:
    from nanoforge.train.sft import train_sft

    ends: list[tuple[float, float]] = []
    with step_clock(ends):
        s = train_sft(env["base"], env["data"], tag=tag, overrides=[
            f"train.max_steps={steps}", "train.eval_every=0", "sft.val_conversations=0", "train.dtype=float32"])
    rows = [json.loads(line) for line in Path(s["metrics"]).read_text().splitlines()]
    return {"first_loss": rows[0]["loss"], "ends": ends}


# --- TRL -------------------------------------------------------------------------------------------------
def trl_rows(env: dict, steps: int, batch: int, seq_len: int) -> tuple[list[list[int]], list[list[int]]]:
    """The rows our loader fed `ours` (same data, config and seed), as (input ids, assistant mask) of
    seq_len + 1 tokens: token t is learned where mask[t] = 1."""
    from nanoforge import checkpoint as ckpt
    from nanoforge.data.chat_loader import ChatLoader
    from nanoforge.train.sft import ChatData, phase_config

    folder, step, meta = ckpt.load_meta(env["base"])
    cfg = phase_config(meta, "sft", overrides=["sft.val_conversations=0"])
    data = ChatData(env["tok"], env["data"], val=None, base=(folder, step, meta), sft=cfg.sft,
                    seq_len=cfg.train.seq_len, seed=cfg.train.seed)
    loader = ChatLoader(data.train_rows, batch_size=batch, seq_len=seq_len, pad_id=env["tok"].bos_id,
                        seed=cfg.train.seed, buffer_size=cfg.sft.buffer_size)
    ids, masks = [], []
    for _, (x, y, m) in zip(range(steps), loader):
        for b in range(x.shape[0]):
            last = int(y[b, -1]) if bool(m[b, -1]) else env["tok"].bos_id
            ids.append(x[b].tolist() + [last])
            masks.append([0] + m[b].int().tolist())
    return ids, masks


def loss_only_head(model: Any) -> None:
    """Re-add TRL's fused LM head computing only the log-probabilities (the loss), not the entropy and
    top-1 flags it computes for its logs; the trainer's metrics then read zeros."""
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, outputs=("log_probs",))
    fused = model.forward

    def forward(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        out = fused(*args, **kwargs)
        if kwargs.get("fused_lm_head"):
            out.entropy = torch.zeros_like(out.log_probs, requires_grad=False)
            out.is_top1 = torch.zeros_like(out.log_probs, dtype=torch.bool)
        return out

    model.forward = forward


def run_trl(env: dict, rows: tuple[list, list], args: argparse.Namespace, home: Path, mode: str) -> dict:
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import SFTConfig, SFTTrainer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(env["export"], dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(env["export"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or "<|bos|>"
    dataset = Dataset.from_dict({"input_ids": rows[0], "assistant_masks": rows[1]})
    ends: list[tuple[float, float]] = []
    losses: list[float] = []
    checkpointed: list[bool] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, model=None, **kw):  # noqa: ANN001, ANN003
            ends.append(now())
            # during training: the Trainer turns checkpointing on in train(), not when it is made
            checkpointed.append(bool(model.is_activation_checkpointing))

        def on_log(self, a, state, control, logs=None, **kw):  # noqa: ANN001, ANN003
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    config = SFTConfig(output_dir=str(home / "trl"), per_device_train_batch_size=args.batch,
                       gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=1e-4,
                       lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no",
                       report_to=[], use_cpu=True, bf16=False, fp16=False,
                       activation_checkpointing=args.trl_checkpointing,
                       packing=True, packing_strategy=mode, max_length=args.seq_len + 1, shuffle_dataset=False,
                       train_sampling_strategy="sequential", dataloader_num_workers=0, seed=0, disable_tqdm=True,
                       max_grad_norm=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # wrapped packing's advice to shuffle; deprecation notes
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # its per-step log dicts would drown the table
    if not args.trl_metrics:
        loss_only_head(trainer.model)
    batch0 = next(iter(trainer.get_train_dataloader()))
    trainer.train()
    return {"first_loss": losses[0], "ends": ends, "checkpointing": any(checkpointed),
            "shape": tuple(batch0["input_ids"].shape), "learned": int((batch0["labels"] != -100).sum())}


# --- the report ------------------------------------------------------------------------------------------
def rates(runs: list[dict], tokens: int) -> dict[str, float]:
    """tokens/s per wall second and per CPU second: step s (s >= 1; step 0 is warm-up) counts with its
    fastest run, the time from the end of step s - 1 to its own end (runs[j]["ends"][s]: the end of step s)."""
    out = {}
    for k, clock in enumerate(("wall", "cpu")):
        per_step = [[r["ends"][i][k] - r["ends"][i - 1][k] for i in range(1, len(r["ends"]))] for r in runs]
        n = min(len(p) for p in per_step)
        best = [min(p[i] for p in per_step) for i in range(n)]
        out[clock] = tokens * len(best) / sum(best)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per run (the first is dropped)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    ap.add_argument("--trl-modes", default=",".join(MODES), help=f"TRL packing modes to run, of {', '.join(MODES)}")
    ap.add_argument("--trl-metrics", action="store_true", help="let TRL compute its per-token entropy and "
                    "accuracy for its logs (its default; the bench turns them off)")
    ap.add_argument("--trl-checkpointing", action="store_true", help="leave TRL's activation checkpointing on "
                    "(its default: recomputes activations in the backward pass; the bench turns it off)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--chat-data", default=None, help="an existing default chat data folder (default: build one "
                    "under $NANOFORGE_HOME)")
    args = ap.parse_args()
    modes = [m for m in args.trl_modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        sys.exit(f"error: --trl-modes takes a comma-separated list of {', '.join(MODES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    chat_data = args.chat_data
    if chat_data is None:  # build it (or find it) in the caller's NANOFORGE_HOME, not in the temporary one
        from nanoforge.data.chat import default_chat_data

        chat_data = str(default_chat_data())
    with tempfile.TemporaryDirectory(prefix="nanoforge-bench-sft-") as tmp:
        home = Path(tmp)
        os.environ["NANOFORGE_HOME"] = str(home)
        from nanoforge import progress
        from nanoforge.export.hf import export_hf

        progress.enable(bars=False, level=logging.ERROR)
        env = setup(home, args.batch, args.seq_len, chat_data)
        env["export"] = export_hf(env["base"], home / "exports" / "bench")
        rows = trl_rows(env, args.steps, args.batch, args.seq_len)
        ours: list[dict] = []
        theirs: dict[str, list[dict]] = {m: [] for m in modes}
        for i in range(args.repeats):
            print(f"run {i + 1}/{args.repeats}: nanoforge train sft ...", file=sys.stderr, flush=True)
            ours.append(run_ours(env, args.steps, f"ours{i}"))
            for m in modes:
                print(f"run {i + 1}/{args.repeats}: TRL SFTTrainer, {m} packing ...", file=sys.stderr, flush=True)
                theirs[m].append(run_trl(env, rows, args, home / f"trl-{m}{i}", m))
    tokens = args.batch * args.seq_len
    a = rates(ours, tokens)
    b = {m: rates(theirs[m], tokens) for m in modes}
    best = max(modes, key=lambda m: b[m]["wall"])
    first = ours[0]["first_loss"]
    gaps = {m: max(abs(r["first_loss"] - first) for r in theirs[m]) for m in modes}
    checkpointing = any(r["checkpointing"] for rs in theirs.values() for r in rs)
    import transformers
    import trl

    print(f"\nSFT, cpu-demo shape, batch {args.batch} × {args.seq_len}, fp32 CPU, {torch.get_num_threads()} "
          f"threads; {args.steps} steps per run (first dropped), fastest of {args.repeats} alternating runs per "
          f"step; torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}\n")
    print("| trainer | tokens/s | ratio ours / this | tokens per CPU second | ratio | first-step loss |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| nanoforge train sft | {a['wall']:,.0f} | | {a['cpu']:,.0f} | | {first:.6f} |")
    for m in modes:
        shape = "×".join(map(str, theirs[m][0]["shape"]))
        print(f"| TRL SFTTrainer, {m} packing (batch {shape}) | {b[m]['wall']:,.0f} | "
              f"{a['wall'] / b[m]['wall']:.2f}× | {b[m]['cpu']:,.0f} | {a['cpu'] / b[m]['cpu']:.2f}× | "
              f"{theirs[m][0]['first_loss']:.6f} |")
    ratio = a["wall"] / b[best]["wall"]
    gap = max(gaps.values())
    print(f"\nratio ours / TRL ({best} packing, the faster): {ratio:.2f}× wall, "
          f"{a['cpu'] / b[best]['cpu']:.2f}× CPU (target ≥ {TARGET}×: {'met' if ratio >= TARGET else 'NOT met'}); "
          f"first-step losses differ by at most {gap:.2e} ({'agree' if gap < 1e-4 else 'DISAGREE'} within 1e-4); "
          f"TRL activation checkpointing (model.is_activation_checkpointing during its steps): "
          f"{'ON' if checkpointing else 'off'}; TRL entropy/accuracy metrics: {'on' if args.trl_metrics else 'off'}")
    return 0 if gap < 1e-4 and checkpointing == args.trl_checkpointing else 1


if __name__ == "__main__":
    sys.exit(main())
