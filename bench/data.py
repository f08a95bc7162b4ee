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


SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                 r"""\s*[\r\n]|\s+(?!\S)|\s+""")


class TiktokenStandIn:
    """rustbpe-trained, tiktoken-encoded, like nanoforge's Tokenizer: used only while that is absent."""

    def __init__(self, files: list[Path], vocab_size: int) -> None:
        import rustbpe
        import tiktoken

        from nanoforge.data.corpus import iter_documents

        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(iter_documents(files), vocab_size - 1, pattern=SPLIT_PATTERN)
        ranks = {bytes(k): v for k, v in bpe.get_mergeable_ranks()}
        self.bos_id = self.eos_id = len(ranks)
        self.enc = tiktoken.Encoding("standin", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                                     special_tokens={"<|bos|>": self.bos_id})
        self.vocab_size, self.name, self.fingerprint = vocab_size, "standin", f"standin-{vocab_size}"

    def encode_batch(self, texts: list[str], bos: bool = False, num_threads: int | None = None) -> list[list[int]]:
        ids = self.enc.encode_ordinary_batch(texts, num_threads=num_threads or 8)
        return [[self.bos_id] + x for x in ids] if bos else ids


def get_tokenizer(files: list[Path], vocab_size: int, work: Path):
    """A nanochat-style tokenizer trained with rustbpe on the corpus (through nanoforge.tokenizer)."""
    try:
        from nanoforge.tokenizer.train import train_tokenizer

        from nanoforge.tokenizer import Tokenizer
    except ImportError:
        tok = TiktokenStandIn(files, vocab_size)
        return tok, tok

    folder = train_tokenizer([str(f) for f in files], vocab_size=vocab_size, backend="rustbpe",
                             out=work / "tok", max_chars=10_000_000, force=True)
    return Tokenizer.load(folder), str(folder)


def bench_tokenize(files: list[Path], tok, tok_folder: Path, work: Path, workers: list[int]) -> list[tuple]:
    from nanoforge.data.corpus import iter_documents
    from nanoforge.data.tokenize import tokenize_corpus

    text_bytes = sum(len(t.encode("utf-8")) for t in iter_documents(files))
    rows = []
    for w in workers:
        out = work / f"tokens_w{w}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        tokenize_corpus(files, tok_folder, out=out, workers=w, val_docs=100)
        dt = time.perf_counter() - t0
        rows.append((f"nanoforge data tokenize, {w} worker(s)", text_bytes / dt / 1e6, dt))

    import datasets

    datasets.disable_progress_bars()
    datasets.disable_caching()
    ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train",
                               cache_dir=str(work / "hf_cache"))

    def encode(batch: dict) -> dict:
        return {"ids": tok.encode_batch(batch["text"], bos=True, num_threads=1)}

    t0 = time.perf_counter()
    ds.map(encode, batched=True, num_proc=2, remove_columns=["text"])
    dt = time.perf_counter() - t0
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

    from nanoforge.model import LLaMA, ModelConfig

    cfg = ModelConfig.from_preset("cpu-demo")
    B, T = 16, cfg.max_seq_len  # cpu-demo: device_batch_size 16, seq_len 256
    model = LLaMA(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.vocab_size, (B, T))
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    dt = (time.perf_counter() - t0) / steps
    return B * T / dt, f"cpu-demo ({cfg.num_params() / 1e6:.1f}M params, B={B}, T={T}): {dt * 1000:.0f} ms/step"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    files = sorted((CORPUS / "de").glob("*.parquet")) + sorted((CORPUS / "en").glob("*.parquet"))
    if not files:
        print(f"needs the shared corpus at {CORPUS}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="nanoforge-bench-data-"))
    os.environ.setdefault("NANOFORGE_HOME", str(work / "home"))
    try:
        tok, tok_folder = get_tokenizer(files, args.vocab_size, work)
        rows, text_bytes = bench_tokenize(files, tok, tok_folder, work, args.workers)
        base = rows[-1][1]
        print(f"## Tokenize ({len(files)} parquet files, de+en, {text_bytes / 1e6:.1f} MB of text, "
              f"vocab {args.vocab_size}, {os.cpu_count()} cores)\n")
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
