"""Data-stage benchmarks, printed as markdown tables with ratios:

1. tokenize throughput (MB of UTF-8 text per second, wall clock, reading parquet included) of
   `nanoforge data tokenize` with 1 and 2 worker processes on ../shared/corpus (de + en), against
   Hugging Face `datasets.map(batched=True, num_proc=2)` with the same tokenizer (target >= 1.5x);
2. TokenLoader throughput (tokens/s, B=8, T=512, every layout) against what one CPU-demo training step
   consumes (forward + backward + AdamW on the cpu-demo model; target >= 50x).

    .venv/bin/python bench/data.py [--vocab-size 8192] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"


def get_tokenizer(files: list[Path], vocab_size: int, work: Path):
    """A nanochat-style tokenizer trained with rustbpe on the corpus (through nanoforge.tokenizer)."""
    from nanoforge.tokenizer import Tokenizer
    from nanoforge.tokenizer.train import train_tokenizer

    folder = train_tokenizer([str(f) for f in files], vocab_size=vocab_size, backend="rustbpe",
                             out=work / "tok", max_chars=10_000_000, force=True)
    return Tokenizer.load(folder), str(folder)


def bench_tokenize(files: list[Path], tok, tok_folder: Path, work: Path, workers: list[int],
                   repeat: int) -> list[tuple]:
    """Best of `repeat` runs each (the machine may be shared: the minimum is the least disturbed)."""
    from nanoforge.data.corpus import iter_documents
    from nanoforge.data.tokenize import tokenize_corpus

    text_bytes = sum(len(t.encode("utf-8")) for t in iter_documents(files))
    rows = []
    for w in workers:
        out = work / f"tokens_w{w}"
        times = []
        for _ in range(repeat):
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            tokenize_corpus(files, tok_folder, out=out, workers=w, val_docs=100)
            times.append(time.perf_counter() - t0)
        rows.append((f"nanoforge data tokenize, {w} worker(s)", text_bytes / min(times) / 1e6, min(times)))

    import datasets

    datasets.disable_progress_bars()
    datasets.disable_caching()
    ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train",
                               cache_dir=str(work / "hf_cache"))

    def encode(batch: dict) -> dict:
        return {"ids": tok.encode_batch(batch["text"], bos=True, num_threads=1)}

    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        ds.map(encode, batched=True, num_proc=2, remove_columns=["text"])
        times.append(time.perf_counter() - t0)
    dt = min(times)
    rows.append(("datasets.map(batched=True, num_proc=2)", text_bytes / dt / 1e6, dt))
    return rows, text_bytes


def bench_loader(tokens_dir: Path, B: int = 8, T: int = 512, seconds: float = 2.0) -> list[tuple]:
    from nanoforge.data.loader import TokenLoader

    rows = []
    for layout in ("packed", "bos_aligned", "unpacked"):
        loader = TokenLoader(tokens_dir, "train", batch_size=B, seq_len=T, layout=layout, buffer_size=256)
        next(loader)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(20):
                next(loader)
            n += 20
        rows.append((layout, n * B * T / (time.perf_counter() - t0)))
    return rows


def train_step_tokens_per_second(vocab_size: int, steps: int = 5) -> tuple[float, str]:
    """Tokens/s a CPU-demo training step consumes (its own batch size and sequence length)."""
    import torch

    from nanoforge.config import load_config
    from nanoforge.model import LLaMA

    run = load_config(preset="cpu-demo")
    cfg = run.model_config()
    B, T = run.train.device_batch_size, run.train.seq_len
    model = LLaMA(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.vocab_size, (B, T))
    times = []
    for _ in range(steps + 1):  # the first step warms up; the fastest counts
        t0 = time.perf_counter()
        loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    dt = min(times[1:])
    return B * T / dt, f"cpu-demo ({cfg.num_params() / 1e6:.1f}M params, B={B}, T={T}): {dt * 1000:.0f} ms/step"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best counts")
    args = ap.parse_args()
    files = sorted((CORPUS / "de").glob("*.parquet")) + sorted((CORPUS / "en").glob("*.parquet"))
    if not files:
        print(f"needs the shared corpus at {CORPUS}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="nanoforge-bench-data-"))
    os.environ.setdefault("NANOFORGE_HOME", str(work / "home"))
    try:
        tok, tok_folder = get_tokenizer(files, args.vocab_size, work)
        rows, text_bytes = bench_tokenize(files, tok, tok_folder, work, args.workers, args.repeat)
        base = rows[-1][1]
        print(f"## Tokenize ({len(files)} parquet files, de+en, {text_bytes / 1e6:.1f} MB of text, "
              f"vocab {args.vocab_size}, {os.cpu_count()} cores)\n")
        print(f"best of {args.repeat} runs each\n")
        print("| method | MB/s | seconds | vs datasets.map |")
        print("| --- | ---: | ---: | ---: |")
        for name, mbs, dt in rows:
            print(f"| {name} | {mbs:.2f} | {dt:.2f} | {mbs / base:.2f}x |")
        step_tps, step_desc = train_step_tokens_per_second(args.vocab_size)
        print(f"\n## Loader (B=8, T=512) vs a training step: {step_desc} = {step_tps:,.0f} tokens/s\n")
        print("| layout | tokens/s | vs training step |")
        print("| --- | ---: | ---: |")
        for layout, tps in bench_loader(work / f"tokens_w{args.workers[0]}"):
            print(f"| {layout} | {tps:,.0f} | {tps / step_tps:,.0f}x |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
