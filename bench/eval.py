"""Multiple-choice evaluation benchmark: `nanoforge eval tasks` (run_tasks) vs lm-evaluation-harness
`--model hf` on the Hugging Face export of the same checkpoint, same task file, same process, fp32 on CPU.

Both read one lm-eval-style YAML (dataset_path: json, absolute data_files) with a hellaswag-shaped task
made from the German corpus (a context of 20-60 words, 4 endings of 5-25 words). The model is the cpu-demo
shape with random weights (scores are ~chance; speed does not depend on training). Our evaluator packs each
question into one row (context once, then the 4 endings masked apart) and many rows into one forward
(nanoforge/eval/packed.py); lm-eval scores every (context, ending) pair as its own padded row,
`--batch_size` rows at a time.

    .venv/bin/python bench/eval.py                      # 200 questions, lm-eval batch size 16
    .venv/bin/python bench/eval.py --docs 50 --batch-sizes 1 16    # batch 1 is ~10x slower still

Prints a markdown table: examples/s (questions per second of scoring, end to end: model load + task
build + scoring, imports excluded), the ratio to lm-eval, and acc / acc_norm of each (must be identical).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "de"


def corpus_words(limit: int = 4000) -> list[list[str]]:
    """Word lists of corpus documents (or of generated sentences when the corpus is absent)."""
    if CORPUS.is_dir():
        from nanoforge.data.corpus import iter_documents

        docs = []
        for text in iter_documents([CORPUS]):
            words = text.split()
            if len(words) >= 90:
                docs.append(words)
            if len(docs) >= limit:
                break
        return docs
    rng = random.Random(0)
    vocab = "der die das Haus Baum Katze Hund rot blau grün groß klein ist hat sieht läuft und oder nicht".split()
    return [[rng.choice(vocab) for _ in range(120)] for _ in range(limit)]


def make_task(folder: Path, docs: list[list[str]], n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = docs[i]
        k = rng.randint(20, 60)
        ending = " ".join(words[k:k + rng.randint(5, 25)])
        others = [" ".join(d[30:30 + rng.randint(5, 25)]) for d in rng.sample(docs[n:], 3)]
        label = rng.randrange(4)
        endings = others[:label] + [ending] + others[label:]
        rows.append({"ctx": " ".join(words[:k]), "endings": endings, "label": label})
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "bench_mc.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    path = folder / "bench_mc.yaml"
    path.write_text("task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                    f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
                    "doc_to_text: \"{{ctx}}\"\ndoc_to_choice: endings\ndoc_to_target: label\n"
                    "metric_list:\n  - metric: acc\n  - metric: acc_norm\n", encoding="utf-8")
    return path


def build(root: Path, docs: list[list[str]]) -> tuple[Path, Path]:
    """(checkpoint folder, HF export folder) of a random cpu-demo-shaped model with a 4096 rustbpe tokenizer."""
    import torch

    from nanoforge.checkpoint import save_checkpoint
    from nanoforge.config import preset_model
    from nanoforge.export.hf import export_hf
    from nanoforge.model import LLaMA
    from nanoforge.tokenizer import Tokenizer
    from nanoforge.tokenizer.train import train_tokenizer

    text = root / "text"
    text.mkdir()
    (text / "docs.txt").write_text("\n\n".join(" ".join(d) for d in docs), encoding="utf-8")
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
    return root / "ckpt", export_hf(root / "ckpt", root / "hf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=200, help="questions (4 endings each)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16], help="lm-eval --batch_size values")
    args = ap.parse_args()

    import lm_eval  # imported before timing: both sides are timed without imports
    import torch
    from lm_eval.tasks import TaskManager

    from nanoforge.eval.tasks import run_tasks

    root = Path(tempfile.mkdtemp(prefix="nanoforge-bench-eval-"))
    docs = corpus_words()
    ckpt, export = build(root, docs)
    task = make_task(root / "task", docs, args.docs)

    rows = []
    t0 = time.perf_counter()
    ours = run_tasks(ckpt, [task])
    ours_s = time.perf_counter() - t0
    ours_r = ours["results"]["bench_mc"]
    rows.append(("nanoforge eval tasks", ours_s, ours_r))
    for bs in args.batch_sizes:
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={export},dtype=float32", device="cpu",
                                      tasks=["bench_mc"], batch_size=bs,
                                      task_manager=TaskManager(include_path=str(task.parent)))
        rows.append((f"lm-eval --model hf (batch {bs})", time.perf_counter() - t0, res["results"]["bench_mc"]))

    print(f"\nmultiple choice, {args.docs} questions x 4 endings, cpu-demo shape (random weights), "
          f"fp32, {torch.get_num_threads()} threads\n")
    print("| evaluator | seconds | examples/s | nanoforge speedup | acc | acc_norm |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, secs, r in rows:
        print(f"| {name} | {secs:.2f} | {args.docs / secs:.1f} | {secs / ours_s:.2f}× | {r['acc,none']:.4f} | "
              f"{r['acc_norm,none']:.4f} |")
    same = all(abs(r[k] - ours_r[k]) <= 1e-6 for _, _, r in rows for k in ("acc,none", "acc_norm,none"))
    print(f"\nscores identical (within 1e-6): {same}; scoring-only rate of nanoforge: "
          f"{ours['nanoforge']['tasks']['bench_mc']['examples_per_second']:.1f} examples/s")


if __name__ == "__main__":
    main()
