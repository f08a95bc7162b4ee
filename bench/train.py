"""Training-step benchmark: our LLaMA vs Hugging Face `LlamaForCausalLM` of the same shape, same weights,
same optimizer (torch AdamW), same batches, same process, fp32 on CPU. HF's step is its forward (SDPA
attention) plus F.cross_entropy on the logits, the same loss as `labels=` (checked equal) without the
label-shifting copy. Our model does its fp32 products through oneDNN where that was measured faster
than torch's default BLAS (nanoforge/model/gemm.py; on AMD CPUs MKL runs AVX2 code only); the row
"ours, torch GEMM" is our model on the same GEMM library as Hugging Face, so the table separates the two
causes. Steps alternate between the models so machine noise hits all alike; tokens/s come from the median step time, the ratio in parentheses from the
fastest step of each (the least disturbed by other jobs on a shared machine).

    .venv/bin/python bench/train.py                 # cpu-demo shape and d384/L6/seq512/b8, 50 steps each
    .venv/bin/python bench/train.py --steps 10 --shapes cpu-demo
    .venv/bin/python bench/train.py --compile        # adds our model under torch.compile (needs a C++ compiler)
    .venv/bin/python bench/train.py --bf16           # ours fp32 vs bf16 autocast, 200 cpu-demo steps, loss curves

Prints a markdown table: tokens/s, ratio, peak training memory (resident memory above the model and
data, one child process per model), activation memory saved for backward, final losses and the largest loss gap over the run, MFU
against this CPU's measured fp32 matmul peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoforge.config import preset_model  # noqa: E402
from nanoforge.model import LLaMA, ModelConfig, gemm  # noqa: E402
from nanoforge.train.mfu import cpu_peak_flops  # noqa: E402

TARGET = 1.2  # ours / Hugging Face tokens per second, both on torch's GEMM library (the eager step itself)
ONEDNN = gemm.use_onednn()  # this machine's choice, as `nanoforge train` makes it
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "de"
SHAPES = {
    "cpu-demo": (lambda: preset_model("cpu-demo"), 256, 16),
    "d384-L6": (lambda: ModelConfig(d_model=384, n_layers=6, n_heads=6, n_kv_heads=6, head_dim=64, ffn_dim=1024,
                                    vocab_size=4096, max_seq_len=512), 512, 8),
}


def hf_model(c: ModelConfig, ours: LLaMA) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_embeddings, attention_bias=False, mlp_bias=False, attn_implementation="sdpa"))
    hf.load_state_dict(to_hf(ours.state_dict()))
    return hf


def to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    pairs = [("tok_embeddings", "model.embed_tokens"), ("attention_norm", "input_layernorm"),
             ("ffn_norm", "post_attention_layernorm"), ("attention.wq", "self_attn.q_proj"),
             ("attention.wk", "self_attn.k_proj"), ("attention.wv", "self_attn.v_proj"),
             ("attention.wo", "self_attn.o_proj"), ("feed_forward.w1", "mlp.gate_proj"),
             ("feed_forward.w3", "mlp.up_proj"), ("feed_forward.w2", "mlp.down_proj")]
    out = {}
    for k, v in sd.items():
        if k == "norm.weight":
            k = "model.norm.weight"
        elif k == "output.weight":
            k = "lm_head.weight"
        else:
            k = k if not k.startswith("layers.") else "model." + k
            for a, b in pairs:
                k = k.replace(a, b)
        out[k] = v
    return out


def batches(vocab: int, batch: int, seq: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Real German text as byte ids (no tokenizer needed), or random ids without the shared corpus."""
    need = n * batch * (seq + 1)
    if CORPUS.is_dir():
        import pyarrow.parquet as pq

        text = "\n".join(pq.read_table(sorted(CORPUS.glob("*.parquet"))[0], columns=["text"]).column(0).to_pylist())
        ids = torch.frombuffer(bytearray(text.encode("utf-8")[:need]), dtype=torch.uint8).long() % vocab
    else:
        ids = torch.randint(0, vocab, (need,), generator=torch.Generator().manual_seed(0))
    ids = ids.view(n, batch, seq + 1)
    return [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in ids]


def ours_step(onednn: bool):
    """Our training step with the given CPU GEMM library (see nanoforge/model/gemm.py)."""

    def step(model: LLaMA, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
        gemm.set_onednn(onednn)
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


step_ours = ours_step(ONEDNN)


def step_hf(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    logits = model(input_ids=x).logits
    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def saved_activation_bytes(fn) -> int:
    """Bytes of distinct tensors autograd saves for backward during `fn()` (forward only)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


BATCH: list[int | None] = [None]  # --batch overrides the shape's batch size


def build(shape: str) -> tuple[ModelConfig, int, int, LLaMA, torch.nn.Module]:
    make, seq, batch = SHAPES[shape]
    batch = BATCH[0] or batch
    c = make()
    torch.manual_seed(0)
    ours = LLaMA(c)
    with torch.no_grad():  # the zero-init residual outputs would make the first steps degenerate for HF
        for blk in ours.layers:
            blk.attention.wo.weight.normal_(0, 0.02)
            blk.feed_forward.w2.weight.normal_(0, 0.02)
    return c, seq, batch, ours, hf_model(c, ours)


def rss_child(shape: str, which: str, steps: int) -> None:
    """Peak resident memory of training steps above the process's memory right before them (weights,
    data and imports excluded; gradients, optimizer state and activations included), sampled every 2 ms."""
    import threading

    import psutil

    c, seq, batch, ours, hf = build(shape)
    model, step = (ours, step_ours) if which == "ours" else (hf, step_hf)
    del ours, hf
    data = batches(c.vocab_size, batch, seq, steps)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    proc = psutil.Process()
    base = peak = proc.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    for x, y in data:
        step(model, opt, x, y)
    done.set()
    t.join()
    print(json.dumps({"peak_mb": (peak - base) / 2**20}))


def bench(shape: str, steps: int, warmup: int, compile: bool = False) -> dict:
    c, seq, batch, ours, hf = build(shape)
    data = batches(c.vocab_size, batch, seq, steps + warmup)
    runs = [("ours", ours, torch.optim.AdamW(ours.parameters(), lr=1e-3), step_ours),
            ("hf", hf, torch.optim.AdamW(hf.parameters(), lr=1e-3), step_hf)]
    if ONEDNN:  # a copy of our weights on torch's GEMM, Hugging Face's
        twin = LLaMA(c)
        twin.load_state_dict(ours.state_dict())
        runs.append(("torch_gemm", twin, torch.optim.AdamW(twin.parameters(), lr=1e-3), ours_step(False)))
    if compile:  # another copy, torch.compile'd (inductor's C++ kernels on CPU)
        twin = LLaMA(c)
        twin.load_state_dict(ours.state_dict())
        runs.append(("compiled", torch.compile(twin), torch.optim.AdamW(twin.parameters(), lr=1e-3), step_ours))
    times: dict[str, list[float]] = {name: [] for name, *_ in runs}
    losses: dict[str, list[float]] = {name: [] for name, *_ in runs}
    for i, (x, y) in enumerate(data):
        for name, model, opt, step in runs:
            t0 = time.perf_counter()
            loss = step(model, opt, x, y)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
                losses[name].append(loss)
    x, y = data[0]
    act = {"ours": saved_activation_bytes(lambda: ours(x, y)),
           "hf": saved_activation_bytes(lambda: F.cross_entropy(hf(input_ids=x).logits.view(-1, c.vocab_size),
                                                                y.view(-1)))}
    rss = {}
    for which in ("ours", "hf"):
        r = subprocess.run([sys.executable, __file__, "--rss-child", which, "--shapes", shape, "--steps", "3",
                            *(["--batch", str(BATCH[0])] if BATCH[0] else [])],
                           capture_output=True, text=True, check=True)
        rss[which] = json.loads(r.stdout.strip().splitlines()[-1])["peak_mb"]
    tokens = batch * seq
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    best = {k: tokens / min(v) for k, v in times.items()}  # least disturbed by other jobs on the machine
    peak = cpu_peak_flops(size=2048, seconds=1.0)
    flops = c.flops_per_token(seq)
    gap = max(abs(a - b) for a, b in zip(losses["ours"], losses["hf"]))
    return {"shape": shape, "params": c.num_params(), "seq": seq, "batch": batch, "tps": tps,
            "ratio": tps["ours"] / tps["hf"], "best_ratio": best["ours"] / best["hf"], "compiled_ratio": tps.get("compiled", 0) / tps["hf"],
            "torch_gemm_ratio": tps.get("torch_gemm", 0) / tps["hf"], "rss": rss, "act_mb": {k: v / 2**20 for k, v in act.items()},
            "loss_first": losses["ours"][0], "loss_last": {k: v[-1] for k, v in losses.items()}, "max_gap": gap,
            "mfu": {k: flops * v / peak for k, v in tps.items()}, "peak_gflops": peak / 1e9}


def bench_bf16(shape: str, steps: int, warmup: int, batch: int | None, every: int) -> None:
    """Our model in fp32 against the same model under bf16 autocast (fp32 master weights and AdamW state, what
    `train.dtype = auto` picks where bf16 products are clearly faster), same init and batches, alternating
    step by step; prints tokens/s and both loss curves."""
    make, seq, default_batch = SHAPES[shape]
    c, batch = make(), batch or default_batch
    torch.manual_seed(0)
    fp32 = LLaMA(c)
    bf16 = LLaMA(c)
    bf16.load_state_dict(fp32.state_dict())
    data = batches(c.vocab_size, batch, seq, steps + warmup)
    runs = {"fp32": (fp32, torch.optim.AdamW(fp32.parameters(), lr=1e-3), None),
            "bf16": (bf16, torch.optim.AdamW(bf16.parameters(), lr=1e-3), torch.bfloat16)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    losses: dict[str, list[float]] = {k: [] for k in runs}
    for i, (x, y) in enumerate(data):
        for name, (model, opt, dtype) in runs.items():
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name].append(loss.item())
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    tps = {k: batch * seq / statistics.median(v) for k, v in times.items()}
    print(f"{shape}, batch {batch}×{seq}, {steps} timed steps (+{warmup} warm-up), AdamW lr 1e-3; "
          f"bf16 products measured {'clearly faster' if gemm.bf16_faster() else 'NOT faster'} than fp32 here "
          f"(train.dtype=auto picks {'bf16' if gemm.bf16_faster() else 'fp32'})\n")
    print(f"| | fp32 | bf16 autocast | bf16 / fp32 |\n|---|---|---|---|\n"
          f"| tokens/s (median step) | {tps['fp32']:,.0f} | {tps['bf16']:,.0f} | **{tps['bf16'] / tps['fp32']:.2f}×** |")
    for lo in range(0, steps + warmup, every):
        hi = min(lo + every, steps + warmup)
        a = statistics.mean(losses["fp32"][lo:hi])
        b = statistics.mean(losses["bf16"][lo:hi])
        print(f"| loss, steps {lo + 1}-{hi} (mean) | {a:.4f} | {b:.4f} | {100 * (b - a) / a:+.2f}% |")
    tail = max(1, (steps + warmup) // 10)
    a, b = statistics.mean(losses["fp32"][-tail:]), statistics.mean(losses["bf16"][-tail:])
    print(f"\nfinal loss (mean of the last {tail} steps): fp32 {a:.4f}, bf16 {b:.4f}, gap {100 * (b - a) / a:+.2f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--compile", action="store_true", help="also time our model under torch.compile")
    ap.add_argument("--bf16", action="store_true",
                    help="instead: our model fp32 vs bf16 autocast (default 200 cpu-demo steps), tokens/s and loss curves")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: the shape's)")
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    BATCH[0] = args.batch
    if args.bf16:
        steps = args.steps if "--steps" in sys.argv else 200
        bench_bf16(args.shapes.split(",")[0] if "--shapes" in sys.argv else "cpu-demo", steps, args.warmup,
                   args.batch, every=max(1, (steps + args.warmup) // 10))
        return
    if args.rss_child:
        rss_child(args.shapes, args.rss_child, args.steps)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, {args.steps} timed steps "
          f"(+{args.warmup} warm-up), AdamW lr 1e-3, same weights and batches; our GEMM library: "
          f"{'oneDNN' if ONEDNN else 'torch default'}\n")
    print("| shape | params | batch×seq | ours tok/s | HF tok/s | ratio | peak train mem ours/HF MB | "
          "activations ours/HF MB | loss first → last ours / HF | max loss gap | MFU ours / HF |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    verdicts = []
    for shape in args.shapes.split(","):
        r = bench(shape, args.steps, args.warmup, args.compile)
        same = r["torch_gemm_ratio"] or r["ratio"]  # ours on torch's GEMM library against HF
        verdicts.append(f"{shape} {same:.2f}× ({'met' if same >= TARGET else 'NOT met'})")
        print(f"| {shape} | {r['params'] / 1e6:.2f}M | {r['batch']}×{r['seq']} | {r['tps']['ours']:,.0f} | "
              f"{r['tps']['hf']:,.0f} | **{r['ratio']:.2f}×** ({r['best_ratio']:.2f}×) | {r['rss']['ours']:,.0f} / {r['rss']['hf']:,.0f} | "
              f"{r['act_mb']['ours']:,.0f} / {r['act_mb']['hf']:,.0f} | {r['loss_first']:.3f} → "
              f"{r['loss_last']['ours']:.4f} / {r['loss_last']['hf']:.4f} | {r['max_gap']:.1e} | "
              f"{100 * r['mfu']['ours']:.1f}% / {100 * r['mfu']['hf']:.1f}% |", flush=True)
        if "torch_gemm" in r["tps"]:
            print(f"|   ↳ ours, torch GEMM | | | {r['tps']['torch_gemm']:,.0f} | | **{r['torch_gemm_ratio']:.2f}×** | | | "
                  f"→ {r['loss_last']['torch_gemm']:.4f} | | {100 * r['mfu']['torch_gemm']:.1f}% |", flush=True)
        if args.compile:
            print(f"|   ↳ ours, torch.compile | | | {r['tps']['compiled']:,.0f} | | **{r['compiled_ratio']:.2f}×** | | | "
                  f"→ {r['loss_last']['compiled']:.4f} | | {100 * r['mfu']['compiled']:.1f}% |", flush=True)
    print(f"\nCPU fp32 matmul peak (2048² matmul, the faster of torch and oneDNN, measured): "
          f"{r['peak_gflops']:,.0f} GFLOP/s")
    print(f"target: ours ≥ {TARGET}× Hugging Face's tokens/s on the same GEMM library (eager, median step): "
          f"{'; '.join(verdicts)}")


if __name__ == "__main__":
    main()
