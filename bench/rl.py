"""RL benchmark: `nanoforge train rl` against TRL's GRPOTrainer on the same exported model, prompts, group
size and reward, in the same process, fp32 on CPU.

Setup (in a temporary $NANOFORGE_HOME): the offline synthetic arithmetic word problems (`#### n` answers),
a small BPE tokenizer (up to --vocab ids) trained on others of their kind, and a chat checkpoint of the
cpu-demo widths with random but non-trivial weights (bench/small_model.py), exported with `export_hf`
(its chat template; generation ends at `<|assistant_end|>` or BOS, as our engine's does). Each step both
sides take the same --prompts prompts (our prompt sampler's order; the token ids each side generated
from are checked to be the same), sample --group completions of each at temperature 1 over the whole
vocabulary, up to --new-tokens tokens, reward each by our `answer_reward` (exact match of the extracted
`#### n`), use advantage = reward − the group's mean (our defaults: no division by the standard
deviation, no KL term; so TRL gets scale_rewards="none", beta=0) and take one AdamW step on the loss
normalised by the step's sampled tokens (TRL's default loss_type="dapo"; on-policy its clipped ratio is
1, so the gradient is ours), in micro-batches of --micro-batch sequences. TRL runs without vLLM, fp32
(bf16=False), without activation checkpointing (TRL turns it on by default; ours has none), sampling
with transformers' `generate`.

What still differs: our engine runs calculator calls and forces their output (TRL is given no tools;
the table counts the forced tokens), prefills each prompt once for its group and batches continuously,
where `generate` pads a batch of prompt copies; TRL also computes the entropy of every position for
its logs.

Measured: rollouts/s = completions / the time from prompts to decoded completions (ours: the engine;
TRL: `GRPOTrainer._generate`), and optimizer steps/s = 1 / the time of a whole step (rollouts, rewards,
loss, backward, optimizer). The sides alternate --repeats times, each run --steps steps with the first
dropped (warm-up); every run repeats the same steps, and each step counts with its fastest run (the
least disturbed by other jobs); the rates per CPU second are shown too. On a machine shared with other
jobs, run with one thread (OMP_NUM_THREADS=1 ... --threads 1): two threads competing for busy cores
were 20-40× slower here, on both sides.

    .venv/bin/python bench/rl.py                  # 4 prompts × 8 samples, 64 new tokens, 3 steps, 4 runs each
    OMP_NUM_THREADS=1 .venv/bin/python bench/rl.py --threads 1
    .venv/bin/python bench/rl.py --prompts 2 --group 4 --new-tokens 32 --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
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

from bench import small_model  # noqa: E402
from bench.small_model import now  # noqa: E402


def settings(args: argparse.Namespace) -> list[str]:
    """Our train_rl overrides for the benchmark's sizes (fp32 CPU, no samples, the smallest held-out
    evaluation: one problem, one sample, at the start and the end, outside the timed steps)."""
    return [f"rl.prompts_per_step={args.prompts}", f"rl.group_size={args.group}",
            f"rl.max_new_tokens={args.new_tokens}", f"rl.max_steps={args.steps}", "rl.eval_prompts=1",
            "rl.eval_samples=1", "rl.trainable=", "rl.sample_batch=0",  # every parameter trains, as in TRL;
            # a step's rollouts are decoded together, as TRL generates them
            f"train.device_batch_size={args.micro_batch}", "train.eval_every=0", "train.sample_every=0",
            "train.save_every=0", "train.dtype=float32", "train.device=cpu", "train.compile=false"]


def setup(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The checkpoint, its export, the problems and the prompt order both sides use: env["steps"][s] is
    step s's list of problem indices (our PromptSampler's order), env["problems"] our Problems."""
    from nanoforge import checkpoint as ckpt
    from nanoforge.config import load_config
    from nanoforge.data.chat import arithmetic_problems
    from nanoforge.export.hf import export_hf
    from nanoforge.tokenizer import Tokenizer
    from nanoforge.train.rl import PromptSampler, problems_from_conversations
    from nanoforge.train.sft import phase_config

    conversations, held_out = arithmetic_problems(args.problems, seed=0, val=1)
    texts = []
    for conv in arithmetic_problems(2000, seed=1)[0]:  # tokenizer text: other problems of the same kind
        for m in conv:
            c = m["content"]
            texts.append(c if isinstance(c, str) else "".join(p["text"] for p in c))
    config = load_config(preset="cpu-demo", overrides=["train.device=cpu", "train.compile=false",
                                                      "train.optimizer=adamw"]).to_dict()  # TRL's
    folder = small_model.make_checkpoint(root, texts, ctx=args.ctx, vocab_size=args.vocab, config=config,
                                         match_vocab=True)
    export = export_hf(folder, root / "hf", force=True)
    _, _, meta = ckpt.load_meta(folder)
    tok = Tokenizer.load(meta["tokenizer"]["path"])
    cfg = phase_config(meta, "rl", overrides=settings(args))
    problems = problems_from_conversations(conversations, tok, where="arithmetic")
    sampler = PromptSampler(len(problems), seed=cfg.train.seed)
    steps = [sampler.take(args.prompts) for _ in range(args.steps)]
    return {"ckpt": folder, "export": export, "tok": tok, "cfg": cfg, "conversations": conversations, "val": held_out,
            "problems": problems, "steps": steps}


def reward(text: str, answer: str) -> float:
    """Both sides' reward: our answer_reward with the default format weight (0)."""
    from nanoforge.train.rl import answer_reward

    return answer_reward(text, answer)


# --- ours ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def timed_rl(log: dict[str, list]) -> Iterator[None]:
    """While active, RLData's training steps and rollouts are timed into log["steps"] / log["rollouts"]
    (wall, CPU): a rollout around the engine's generation of a step's completions (the held-out
    evaluation's are not counted), a step from that rollout's start to the step_metrics call that
    follows the optimizer step."""
    from nanoforge.train.rl import RLData

    gen, metrics = RLData._generate, RLData.step_metrics
    state: dict[str, Any] = {}

    def _generate(self, raw, indices, problems, params, n):  # noqa: ANN001, ANN202
        t0 = now()
        out = gen(self, raw, indices, problems, params, n)
        t1 = now()
        if problems is self.problems:
            state["t0"] = t0
            log["rollouts"].append({"wall": t1[0] - t0[0], "cpu": t1[1] - t0[1], "n": len(out),
                                    "tokens": sum(sum(r.mask) for r in out),
                                    "forced": sum(len(r.mask) - sum(r.mask) for r in out),
                                    "stopped": sum(r.finish_reason == "stop" for r in out),
                                    "reward": sum(r.reward for r in out),
                                    "prompts": [problems[i].prompt_ids for i in indices for _ in range(n)]})
        return out

    def step_metrics(self):  # noqa: ANN001, ANN202
        if "t0" in state:
            t0, t1 = state.pop("t0"), now()
            log["steps"].append({"wall": t1[0] - t0[0], "cpu": t1[1] - t0[1]})
        return metrics(self)

    RLData._generate, RLData.step_metrics = _generate, step_metrics
    try:
        yield
    finally:
        RLData._generate, RLData.step_metrics = gen, metrics


def run_ours(env: dict[str, Any], args: argparse.Namespace, tag: str) -> dict[str, list]:
    from nanoforge.train.rl import train_rl

    log: dict[str, list] = {"steps": [], "rollouts": []}
    with timed_rl(log):
        train_rl(env["ckpt"], env["conversations"], val=env["val"], tag=tag, overrides=settings(args))
    return log


# --- TRL -------------------------------------------------------------------------------------------------
def trl_dataset(env: dict[str, Any]) -> Any:
    """The prompts in the order our sampler takes them (TRL reads them sequentially, shuffle off): one
    conversational prompt (the user's question) and the answer to check per row."""
    from datasets import Dataset

    rows = [env["problems"][i] for step in env["steps"] for i in step]
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": p.question}] for p in rows],
                              "answer": [p.answer for p in rows]})


def trl_reward(prompts: list, completions: list, answer: list[str], **kwargs: Any) -> list[float]:
    """TRL's reward function: our reward of each completion's text (TRL decodes without special tokens)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [reward(t, a) for t, a in zip(texts, answer)]


def trl_config(env: dict[str, Any], args: argparse.Namespace, out: Path) -> Any:
    from trl import GRPOConfig

    cfg, rc = env["cfg"], env["cfg"].rl
    per_step = args.prompts * args.group
    if per_step % args.micro_batch:
        sys.exit(f"error: --prompts × --group ({per_step}) must be a multiple of --micro-batch ({args.micro_batch})")
    return GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=per_step // args.micro_batch,  # one generation per optimizer step
        num_generations=args.group, max_completion_length=args.new_tokens, max_steps=args.steps,
        temperature=rc.temperature, top_k=rc.top_k, top_p=1.0, beta=rc.kl_coef,
        scale_rewards="group" if rc.normalize_std else "none", loss_type="dapo", num_iterations=1,
        learning_rate=cfg.train.lr, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=cfg.train.grad_clip,
        shuffle_dataset=False, seed=cfg.train.seed, use_cpu=True, bf16=False, fp16=False,
        activation_checkpointing=False, report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, log_completions=False)


def run_trl(env: dict[str, Any], args: argparse.Namespace, out: Path) -> dict[str, list]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOTrainer

    log: dict[str, list] = {"steps": [], "rollouts": [], "rewards": []}

    class Timed(GRPOTrainer):
        def _generate(self, prompts):  # noqa: ANN001, ANN202
            t0 = now()
            result = super()._generate(prompts)
            t1 = now()
            prompt_ids, completion_ids = result[0], result[1]
            ends = set(self.eos_token_ids)
            log["rollouts"].append({"wall": t1[0] - t0[0], "cpu": t1[1] - t0[1], "n": len(completion_ids),
                                    "tokens": sum(len(c) for c in completion_ids), "forced": 0,
                                    "stopped": sum(bool(c) and c[-1] in ends for c in completion_ids),
                                    "prompts": [list(p) for p in prompt_ids]})
            return result

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):  # noqa: ANN001, ANN003
            self.t0 = now()

        def on_step_end(self, a, state, control, **kw):  # noqa: ANN001, ANN003
            t1 = now()
            log["steps"].append({"wall": t1[0] - self.t0[0], "cpu": t1[1] - self.t0[1]})

    def rewarded(prompts, completions, answer, **kw):  # noqa: ANN001, ANN003, ANN202
        r = trl_reward(prompts, completions, answer)
        log["rewards"].append(sum(r))
        return r

    rewarded.__name__ = "answer_reward"
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(env["export"], dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(env["export"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # TRL asks the model the old name of activation checkpointing: transformers' FutureWarning, not ours to fix
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    trainer = Timed(model=model, reward_funcs=rewarded, args=trl_config(env, args, out),
                    train_dataset=trl_dataset(env), processing_class=tokenizer, callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # its per-step log dicts would drown the table
    trainer.train()
    for ro, r in zip(log["rollouts"], log["rewards"]):
        ro["reward"] = r
    return log


# --- the report ------------------------------------------------------------------------------------------
def summarise(logs: list[dict[str, list]]) -> dict[str, float]:
    """Rollouts/s, generated tokens/s and optimizer steps/s per wall-clock and per CPU second. Every run
    does the same steps (same prompts, same seeds), so each step after the first counts with its fastest
    run (wall and CPU separately): the rates are totals over the sums of those times. Also the
    completions' mean length, stop rate and reward over all runs."""
    timed = range(1, len(logs[0]["steps"])) if len(logs[0]["steps"]) > 1 else range(1)
    out: dict[str, float] = {}
    for clock in ("wall", "cpu"):
        suffix = "" if clock == "wall" else "_cpu"
        ro = [min((log["rollouts"][i] for log in logs), key=lambda r: r[clock]) for i in timed]
        st = [min(log["steps"][i][clock] for log in logs) for i in timed]
        seconds = sum(r[clock] for r in ro)
        out["rollouts_s" + suffix] = sum(r["n"] for r in ro) / seconds
        out["tokens_s" + suffix] = sum(r["tokens"] + r["forced"] for r in ro) / seconds
        out["steps_s" + suffix] = len(st) / sum(st)
    everything = [r for log in logs for r in log["rollouts"]]
    n = sum(r["n"] for r in everything)
    out.update(length=sum(r["tokens"] + r["forced"] for r in everything) / n,
               stopped=sum(r["stopped"] for r in everything) / n, forced=sum(r["forced"] for r in everything),
               reward=sum(r["reward"] for r in everything) / n)
    return out


def same_prompts(env: dict[str, Any], logs: list[dict[str, list]], group: int) -> bool:
    """Every run's rollouts started from the prompts of our sampler's order, each repeated `group` times."""
    expect = [[env["problems"][i].prompt_ids for i in step for _ in range(group)] for step in env["steps"]]
    return all([r["prompts"] for r in log["rollouts"]] == expect for log in logs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step (rl.prompts_per_step)")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (rl.group_size, num_generations)")
    ap.add_argument("--new-tokens", type=int, default=64, help="longest completion (rl.max_new_tokens, "
                    "max_completion_length)")
    ap.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward "
                    "(train.device_batch_size, per_device_train_batch_size)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is dropped)")
    ap.add_argument("--repeats", type=int, default=4, help="runs of each side, alternating")
    ap.add_argument("--problems", type=int, default=200, help="arithmetic problems the prompts are drawn from")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="nanoforge-bench-rl-") as tmp:
        root = Path(tmp)
        os.environ["NANOFORGE_HOME"] = str(root / "home")
        from nanoforge import progress

        progress.enable(bars=False, level=logging.ERROR)  # every run would warn that rewards gave no signal
        env = setup(root, args)
        ours, theirs = [], []
        for i in range(args.repeats):
            print(f"run {i + 1}/{args.repeats}: nanoforge train rl ...", file=sys.stderr, flush=True)
            ours.append(run_ours(env, args, f"ours{i}"))
            print(f"run {i + 1}/{args.repeats}: TRL GRPOTrainer ...", file=sys.stderr, flush=True)
            theirs.append(run_trl(env, args, root / f"trl{i}"))
    same = same_prompts(env, ours, args.group) and same_prompts(env, theirs, args.group)
    a, b = summarise(ours), summarise(theirs)
    import transformers
    import trl

    c = env["cfg"].model
    print(f"\nRL, model d_model {c.d_model}, {c.n_layers} layers, vocab {c.vocab_size} (random weights), fp32 CPU, "
          f"{torch.get_num_threads()} threads; {args.prompts} prompts × {args.group} completions of up to "
          f"{args.new_tokens} tokens per step, micro-batches of {args.micro_batch}; {args.steps} steps per run "
          f"(first dropped), fastest of {args.repeats} alternating runs per step; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, trl {trl.__version__}\n")
    print("| measure | nanoforge train rl | TRL GRPOTrainer | ratio | per CPU second: nanoforge | TRL | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, key, fmt in (("rollouts/s (completions generated per second)", "rollouts_s", ".2f"),
                            ("generated tokens/s", "tokens_s", ",.0f"), ("optimizer steps/s", "steps_s", ".3f")):
        cpu = key + "_cpu"
        print(f"| {label} | {a[key]:{fmt}} | {b[key]:{fmt}} | {a[key] / b[key]:.2f}× | {a[cpu]:{fmt}} | "
              f"{b[cpu]:{fmt}} | {a[cpu] / b[cpu]:.2f}× |")
    print(f"| mean completion length (tokens) | {a['length']:.1f} | {b['length']:.1f} | | | | |")
    print(f"| completions that stopped at <\\|assistant_end\\|> or BOS | {100 * a['stopped']:.1f}% | "
          f"{100 * b['stopped']:.1f}% | | | | |")
    print(f"| mean reward | {a['reward']:.3f} | {b['reward']:.3f} | | | | |")
    print(f"\nsame prompt ids on both sides, every step: {'yes' if same else 'NO'}; tool-output tokens forced "
          f"in our rollouts: {int(a['forced'])}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
