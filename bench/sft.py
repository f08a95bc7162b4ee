"""SFT benchmark: `nanoforge train sft` against TRL's SFTTrainer on the same model, data and batches, in the
same process, fp32 on CPU.

Setup (in a temporary $NANOFORGE_HOME): the offline default chat data, a 4,096-token tokenizer trained on
it, and a base checkpoint of the cpu-demo shape (random init). Ours: `train_sft` for --steps steps
(rows packed best-fit, loss on the assistant tokens). TRL: the exported model (`nanoforge export hf`,
LlamaForCausalLM, SDPA) trained by `SFTTrainer` on exactly the rows our loader produced, pre-tokenized with
their assistant masks (the `assistant_masks` column, from which TRL builds its -100 labels: its
assistant-only loss for tokenized data), `packing=True` (bfd; each row is max_length long, so each row is
one packed sequence, padding-free with positions restarting per row), sequential sampling, the same batch
size, no gradient accumulation. Both losses are the mean over the batch's learned tokens, so the first
step's losses must agree (within 1e-4). tokens/s = batch × seq_len / the median step time (first step
dropped); ours per step includes loading the batch.

    .venv/bin/python bench/sft.py                 # 12 steps each, batch 16 × 256
    .venv/bin/python bench/sft.py --steps 6 --batch 8 --chat-data ~/.cache/nanoforge/chat/default-py3.11
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET = 1.3  # ours / TRL tokens per second


def setup(home: Path, batch: int, seq_len: int, chat_data: str | None) -> dict:
    import torch

    from nanoforge import checkpoint as ckpt
    from nanoforge.config import load_config
    from nanoforge.data.chat import default_chat_data
    from nanoforge.model import LLaMA
    from nanoforge.tokenizer import Tokenizer
    from nanoforge.tokenizer.train import train_tokenizer

    data = Path(chat_data) if chat_data else default_chat_data()
    text = []
    for f in sorted((data / "train").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            for m in json.loads(line)["messages"]:
                c = m["content"]
                text.append(c if isinstance(c, str) else "".join(p["text"] for p in c))
    (home / "text").mkdir(parents=True)
    (home / "text" / "chat.txt").write_text("\n\n".join(text), encoding="utf-8")
    tok_dir = train_tokenizer(home / "text", vocab_size=4096, backend="rustbpe", out=home / "tokenizers" / "chat4k")
    tok = Tokenizer.load(tok_dir)
    cfg = load_config(preset="cpu-demo", overrides=[f"model.vocab_size={tok.vocab_size}",
                                                    f"train.device_batch_size={batch}", f"train.seq_len={seq_len}",
                                                    f"train.total_batch_tokens={batch * seq_len}",
                                                    "train.device=cpu", "train.compile=false"])
    torch.manual_seed(0)
    model = LLaMA(cfg.model_config())
    meta = {"phase": "base", "tag": "bench", "model_config": cfg.model_config().to_dict(), "config": cfg.to_dict(),
            "tokenizer": {"path": str(tok_dir), "name": tok.name, "fingerprint": tok.fingerprint}}
    folder = home / "checkpoints" / "base" / "bench"
    ckpt.save_checkpoint(folder, 0, model, None, meta)
    return {"data": data / "train.toml", "tok": tok, "base": folder}


def ours(env: dict, steps: int) -> dict:
    from nanoforge.train.sft import train_sft

    s = train_sft(env["base"], env["data"], tag="ours", overrides=[
        f"train.max_steps={steps}", "train.eval_every=0", "sft.val_conversations=0", "train.dtype=float32"])
    rows = [json.loads(line) for line in Path(s["metrics"]).read_text().splitlines()]
    return {"first_loss": rows[0]["loss"], "step_times": [r["step_time"] for r in rows]}


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


def run_trl(env: dict, steps: int, batch: int, seq_len: int, home: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from nanoforge.export.hf import export_hf

    out = export_hf(env["base"], home / "exports" / "bench")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(out)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or "<|bos|>"
    ids, masks = trl_rows(env, steps, batch, seq_len)
    dataset = Dataset.from_dict({"input_ids": ids, "assistant_masks": masks})
    times: list[float] = []
    losses: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN003
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001, ANN003
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    config = SFTConfig(output_dir=str(home / "trl"), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                       max_steps=steps, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0,
                       logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False,
                       packing=True, packing_strategy="bfd", max_length=seq_len + 1, shuffle_dataset=False,
                       train_sampling_strategy="sequential", dataloader_num_workers=0, seed=0,
                       disable_tqdm=True, max_grad_norm=1.0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[Timer()])
    first = trainer.get_train_dataloader()
    batch0 = next(iter(first))
    learned = int((batch0["labels"] != -100).sum())
    trainer.train()
    return {"first_loss": losses[0], "step_times": times, "first_batch_learned": learned}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--chat-data", default=None, help="an existing default chat data folder (default: build one, "
                    "which takes a few minutes)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nanoforge-bench-sft-") as tmp:
        home = Path(tmp)
        os.environ["NANOFORGE_HOME"] = str(home)
        from nanoforge import progress

        progress.enable(bars=False)
        env = setup(home, args.batch, args.seq_len, args.chat_data)
        a = ours(env, args.steps)
        b = run_trl(env, args.steps, args.batch, args.seq_len, home)
    tokens = args.batch * args.seq_len
    tps_ours = tokens / statistics.median(a["step_times"][1:])
    tps_trl = tokens / statistics.median(b["step_times"][1:])
    ratio = tps_ours / tps_trl
    gap = abs(a["first_loss"] - b["first_loss"])
    import torch
    import trl

    print(f"SFT, cpu-demo shape, batch {args.batch} × {args.seq_len}, {args.steps} steps, fp32 CPU, "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}, trl {trl.__version__}\n")
    print("| trainer | tokens/s | first-step loss |")
    print("|---|---:|---:|")
    print(f"| nanoforge train sft | {tps_ours:,.0f} | {a['first_loss']:.6f} |")
    print(f"| TRL SFTTrainer (assistant masks, packing) | {tps_trl:,.0f} | {b['first_loss']:.6f} |")
    print(f"\nratio ours / TRL: {ratio:.2f}× (target ≥ {TARGET}×: {'met' if ratio >= TARGET else 'NOT met'}); "
          f"first-step losses differ by {gap:.2e} ({'agree' if gap < 1e-4 else 'DISAGREE'} within 1e-4)")
    return 0 if gap < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
