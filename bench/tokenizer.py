"""Tokenizer benchmark: training wall time and peak RSS of our three backends against rustbpe and Hugging Face
tokenizers called directly, and encode throughput of `Tokenizer` against tiktoken and HF tokenizers.

    .venv/bin/python bench/tokenizer.py                          # 2 MB slice + all of ../shared/corpus/de, 8,192
    .venv/bin/python bench/tokenizer.py --vocab 8192 32768 --with-en

Every trainer runs in its own subprocess, so its peak RSS is its own: we report the process's peak plus the
peak of its largest child (the python backend's pre-tokenization workers), from getrusage. The trainers of a
setting take turns (rustbpe, ours, rustbpe, ours, ...) `--repeat` times and the fastest run of each counts, so
a neighbour's load on a shared machine hits them alike. Wall and CPU seconds are reported. The trainers that
produce tiktoken ranks (rustbpe, our rustbpe and python backends) are checked to give identical merges.
Prints markdown.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CORPUS = ROOT.parent / "shared" / "corpus"
REPEAT = 3
TRAINERS = ["rustbpe (direct)", "hf tokenizers (direct)", "nanoforge rustbpe", "nanoforge neox", "nanoforge python"]


def _docs(data: list[str], max_chars: int | None):
    from nanoforge.data.corpus import iter_documents

    n = 0
    for d in iter_documents(data):
        n += len(d)
        yield d
        if max_chars is not None and n > max_chars:
            return


def worker(kind: str, data: list[str], vocab: int, max_chars: int | None) -> dict:
    """Train once in this process; return wall and CPU seconds, peak RSS (MB) and a digest of the merges."""
    from nanoforge.tokenizer import NANOCHAT_PATTERN, SPECIAL_TOKENS

    t0, c0 = time.perf_counter(), _cpu_seconds()
    if kind == "rustbpe (direct)":
        import rustbpe
        import tiktoken

        r = rustbpe.Tokenizer()
        r.train_from_iterator(_docs(data, max_chars), vocab - len(SPECIAL_TOKENS), pattern=NANOCHAT_PATTERN)
        ranks = {bytes(b): i for b, i in r.get_mergeable_ranks()}
        tiktoken.Encoding("x", pat_str=NANOCHAT_PATTERN, mergeable_ranks=ranks,
                          special_tokens={s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)})
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    elif kind == "hf tokenizers (direct)":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        hf.train_from_iterator(_docs(data, max_chars), trainers.BpeTrainer(
            vocab_size=vocab, special_tokens=SPECIAL_TOKENS, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        ranks = None
    else:
        from nanoforge.tokenizer import Tokenizer
        from nanoforge.tokenizer.train import train_tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            path = train_tokenizer(data, vocab_size=vocab, backend=kind.split()[1], out=Path(tmp) / "tok",
                                   max_chars=max_chars)
            seconds = time.perf_counter() - t0
            _stop_fork_server()
            cpu = _cpu_seconds() - c0
            ranks = Tokenizer.load(path).ranks if kind != "nanoforge neox" else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    merges = None if ranks is None else hashlib.sha256(repr(sorted(ranks.items(), key=lambda kv: kv[1])).encode()).hexdigest()
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": rss / 1024, "merges": merges}


def _stop_fork_server() -> None:
    """The python backend's pre-tokenization workers are children of multiprocessing's fork server, so their
    CPU time reaches this process's RUSAGE_CHILDREN only once the server (which reaps them) has exited."""
    from multiprocessing import forkserver

    forkserver._forkserver._stop()  # private, but the only way; a later use would start a new server


def _cpu_seconds() -> float:
    """CPU time of this process, its threads and its finished children: on a machine shared with other jobs
    it moves much less than wall time (which counts the time other processes held the cores)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_worker(kind: str, data: list[str], vocab: int, max_chars: int | None) -> dict:
    """One training run in a fresh process."""
    cmd = [sys.executable, __file__, "--worker", kind, "--data", *data, "--vocab", str(vocab)]
    if max_chars:
        cmd += ["--max-chars", str(max_chars)]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])


def run_turns(kinds: list[str], data: list[str], vocab: int, max_chars: int | None, repeat: int = REPEAT
              ) -> dict[str, dict]:
    """Each trainer `repeat` times, taking turns; per trainer the fastest wall and CPU time (a run is a few
    seconds, so one noisy neighbour can add 10% or more) and the largest peak RSS."""
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for _ in range(repeat):
        for kind in kinds:
            runs[kind].append(run_worker(kind, data, vocab, max_chars))
    return {k: {"seconds": min(r["seconds"] for r in rs), "cpu_seconds": min(r["cpu_seconds"] for r in rs),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "merges": rs[0]["merges"]}
            for k, rs in runs.items()}


def _same_merges(results: dict[str, dict]) -> str:
    digests = {k: r["merges"] for k, r in results.items() if r["merges"]}
    if len(digests) < 2:
        return ""
    same = len(set(digests.values())) == 1
    return f"merges of {', '.join(digests)}: {'identical' if same else 'DIFFERENT'}"


def encode_bench(data: list[str], vocab: int) -> list[tuple[str, float, float]]:
    """(engine, single MB/s, batch MB/s) on every document under `data`."""
    from tokenizers import Tokenizer as HFTokenizer

    from nanoforge.tokenizer import Tokenizer
    from nanoforge.tokenizer.train import train_tokenizer

    docs = list(_docs(data, None))
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        tok = Tokenizer.load(train_tokenizer(data, vocab_size=vocab, backend="rustbpe", out=Path(tmp) / "t"))
        hf = HFTokenizer.from_file(str(tok.path / "hf" / "tokenizer.json"))
    hf.encode_special_tokens = True
    enc = tok._enc
    engines = {
        "nanoforge Tokenizer": (tok.encode, tok.encode_batch),
        "tiktoken (direct)": (enc.encode_ordinary, lambda ds: enc.encode_ordinary_batch(ds, num_threads=8)),
        "hf tokenizers (direct)": (lambda d: hf.encode(d, add_special_tokens=False).ids,
                                   lambda ds: hf.encode_batch(ds, add_special_tokens=False)),
    }
    rows = []
    for name, (single, batch) in engines.items():
        best_s = best_b = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for d in docs:
                single(d)
            best_s = min(best_s, time.perf_counter() - t)
            t = time.perf_counter()
            batch(docs)
            best_b = min(best_b, time.perf_counter() - t)
        rows.append((name, mb / best_s, mb / best_b))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", nargs="+", default=[str(CORPUS / "de")])
    ap.add_argument("--vocab", type=int, nargs="+", default=[8192])
    ap.add_argument("--max-chars", type=int, default=None)
    ap.add_argument("--with-en", action="store_true", help="also: the python backend on de + en")
    ap.add_argument("--repeat", type=int, default=REPEAT, help="training runs per trainer; the fastest counts")
    ap.add_argument("--trainers", nargs="+", default=TRAINERS, choices=TRAINERS, help="only these (rustbpe first)")
    ap.add_argument("--no-slice", action="store_true", help="skip the 2 MB slice")
    ap.add_argument("--no-encode", action="store_true", help="skip the encode benchmark")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.vocab[0], args.max_chars)))
        return

    print(f"## Training (fastest of {args.repeat} runs, the trainers taking turns; peak RSS; ratio = / rustbpe direct in the same setting)\n")
    print("| data | vocab | trainer | seconds | × rustbpe | CPU seconds | × rustbpe | peak RSS MB | × rustbpe |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    settings = [("de, first 2 MB", args.data, 2_000_000), ("de, all", args.data, None)][args.no_slice:]
    if args.with_en:
        settings.append(("de + en", [str(CORPUS / "de"), str(CORPUS / "en")], None))
    checks = []
    for vocab in args.vocab:
        for label, data, max_chars in settings:
            if label == "de + en" and vocab != args.vocab[0]:
                continue
            kinds = args.trainers if label != "de + en" else ["rustbpe (direct)", "nanoforge python"]
            results = run_turns(kinds, data, vocab, max_chars, args.repeat)
            base = results[kinds[0]]
            for kind, r in results.items():
                print(f"| {label} | {vocab:,} | {kind} | {r['seconds']:.2f} | {r['seconds'] / base['seconds']:.2f} "
                      f"| {r['cpu_seconds']:.2f} | {r['cpu_seconds'] / base['cpu_seconds']:.2f} "
                      f"| {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / base['peak_rss_mb']:.2f} |", flush=True)
            if same := _same_merges(results):
                checks.append(f"- {label}, vocab {vocab:,}: {same}")
    if checks:
        print("\n" + "\n".join(checks))

    if args.no_encode:
        return
    print(f"\n## Encode throughput on {', '.join(args.data)} (vocab {args.vocab[0]:,}, best of 3)\n")
    print("| engine | single MB/s | × tiktoken | batch MB/s | × tiktoken |")
    print("|---|---:|---:|---:|---:|")
    rows = encode_bench(args.data, args.vocab[0])
    tk = next(r for r in rows if r[0].startswith("tiktoken"))
    for name, s, b in rows:
        print(f"| {name} | {s:.1f} | {s / tk[1]:.2f} | {b:.1f} | {b / tk[2]:.2f} |")


if __name__ == "__main__":
    main()
