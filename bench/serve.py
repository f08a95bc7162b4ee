"""Serving benchmark: `nanoforge serve` vs `transformers serve` on the same Hugging Face export, the same
requests from the same client, fp32 on CPU.

The model is the cpu-demo shape with random weights (speed does not depend on training) and a 4096-token
rustbpe tokenizer; both servers run as their own processes with the same thread count and serve the
export folder. The client (nanoforge/infer/loadgen.py, stdlib HTTP) sends `/v1/completions` requests with
`stream: true`, greedy, a fixed `max_tokens`, `concurrency` at a time, and measures time to first token
and aggregate completion tokens per second (sum of tokens / wall time). The legacy completions route is
used because it needs no chat template, so both servers get exactly the same token ids.

    .venv/bin/python bench/serve.py                         # concurrency 1, 4, 16; 48 tokens per request
    .venv/bin/python bench/serve.py --concurrency 1 16 --max-tokens 64 --threads 2

Prints a markdown table: p50 time to first token and tokens/s of each server, the ratio of ours to
theirs, and how many replies were identical (greedy on the same weights: all of them, unless a stop
token falls differently).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CORPUS = ROOT.parent / "shared" / "corpus" / "de"

WORDS = ("der die das Haus Baum Katze Hund rot blau grün groß klein ist hat sieht läuft schnell langsam und "
         "oder nicht ein eine Sonne Mond Stern Wasser Feuer Erde Himmel zwei drei vier fünf").split()


def documents(limit: int = 3000) -> list[list[str]]:
    """Word lists of German corpus documents (generated sentences when ../shared/corpus is absent)."""
    if CORPUS.is_dir():
        from nanoforge.data.corpus import iter_documents

        docs = []
        for text in iter_documents([CORPUS]):
            if len(text.split()) >= 40:
                docs.append(text.split())
            if len(docs) >= limit:
                break
        return docs
    rng = random.Random(0)
    return [[rng.choice(WORDS) for _ in range(rng.randint(20, 120))] for _ in range(limit)]


def build(root: Path) -> Path:
    """The HF export of a random cpu-demo-shaped model with a 4096 rustbpe tokenizer."""
    import torch

    from nanoforge.checkpoint import save_checkpoint
    from nanoforge.config import preset_model
    from nanoforge.export.hf import export_hf
    from nanoforge.model import LLaMA
    from nanoforge.tokenizer import Tokenizer
    from nanoforge.tokenizer.train import train_tokenizer

    text = root / "text"
    text.mkdir()
    (text / "docs.txt").write_text("\n\n".join(" ".join(d) for d in documents()), encoding="utf-8")
    tok_path = train_tokenizer(text, vocab_size=4096, backend="rustbpe", out=root / "tok")
    tok = Tokenizer.load(tok_path)
    cfg = preset_model("cpu-demo")
    cfg.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = LLaMA(cfg)
    model.init_weights()
    meta = {"phase": "base", "tag": "bench", "model_config": cfg.to_dict(), "config": None,
            "tokenizer": {"path": str(tok_path), "name": tok.name, "fingerprint": tok.fingerprint}}
    save_checkpoint(root / "ckpt", 1, model, None, meta)
    return export_hf(root / "ckpt", root / "bench")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} (see its log)")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not become healthy in {timeout:.0f}s")


def main() -> None:
    from nanoforge.infer.loadgen import run_load

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--requests", type=int, default=0, help="requests per level (default: max(3, concurrency))")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of each server (1: on a shared 2-core machine more threads only spin)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    export = build(tmp)
    env = {**os.environ, "NANOFORGE_HOME": str(tmp / "home"), "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    bin_dir = Path(sys.executable).parent
    ours_port, theirs_port = free_port(), free_port()
    servers = {
        "nanoforge serve": ([sys.executable, "-m", "nanoforge", "serve", str(export), "--port", str(ours_port),
                             "--device", "cpu", "--max-batch", "16", "--threads", str(args.threads)],
                            f"http://127.0.0.1:{ours_port}", "export/bench"),
        "transformers serve": ([str(bin_dir / "transformers"), "serve", str(export), "--host", "127.0.0.1", "--port",
                                str(theirs_port), "--device", "cpu", "--dtype", "float32"],
                               f"http://127.0.0.1:{theirs_port}", str(export)),
    }
    rng = random.Random(1)
    docs = documents(200)
    procs = []
    results: dict[str, dict[int, dict]] = {}
    try:
        for name, (cmd, url, _) in servers.items():
            log = open(tmp / f"{name.split()[0]}.log", "w")
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
            wait_healthy(url, procs[-1])
        for _, url, model_id in servers.values():
            warm = {"model": model_id, "prompt": "der Hund", "max_tokens": 4, "temperature": 0}
            run_load(url, [warm], concurrency=1, path="/v1/completions")
        for c in args.concurrency:
            n = args.requests or max(3, c)
            prompts = [" ".join(rng.choice(docs)[:30]) for _ in range(n)]
            for name, (_, url, model_id) in servers.items():
                bodies = [{"model": model_id, "prompt": p, "max_tokens": args.max_tokens, "temperature": 0}
                          for p in prompts]
                r = run_load(url, bodies, concurrency=c, path="/v1/completions")
                if r["errors"]:
                    raise SystemExit(f"{name} at concurrency {c}: {r['errors'][0]}")
                results.setdefault(name, {})[c] = r
                print(f"{name:20s} concurrency {c:2d}: TTFT p50 {r['ttft_p50_s'] * 1e3:7.1f} ms  "
                      f"{r['tokens_per_s']:7.1f} tokens/s", file=sys.stderr)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()

    ours, theirs = results["nanoforge serve"], results["transformers serve"]
    print(f"\nServing a random cpu-demo model (fp32 CPU, {args.threads} threads per server, greedy, "
          f"{args.max_tokens} tokens per request, streamed /v1/completions)\n")
    print("| concurrency | requests | TTFT p50 ours | TTFT p50 transformers | tokens/s ours | tokens/s transformers "
          "| speed ratio | TTFT ratio | same text |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    ok = True
    for c in args.concurrency:
        a, b = ours[c], theirs[c]
        same = sum(x["text"] == y["text"] for x, y in zip(a["results"], b["results"]))
        ratio = a["tokens_per_s"] / b["tokens_per_s"]
        ok &= ratio > 1 and (c < 16 or ratio >= 2)
        print(f"| {c} | {len(a['results'])} | {a['ttft_p50_s'] * 1e3:.0f} ms | {b['ttft_p50_s'] * 1e3:.0f} ms | "
              f"{a['tokens_per_s']:.0f} | {b['tokens_per_s']:.0f} | {ratio:.2f}× | "
              f"{b['ttft_p50_s'] / a['ttft_p50_s']:.2f}× | {same}/{len(a['results'])} |")
    print(f"\ntarget (ahead at every concurrency, ≥ 2× tokens/s at 16): {'met' if ok else 'NOT met'}")
    print(json.dumps({name: {c: {k: v for k, v in r.items() if k != "results"} for c, r in res.items()}
                      for name, res in results.items()}), file=sys.stderr)


if __name__ == "__main__":
    main()
