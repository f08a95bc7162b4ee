"""Reinforcement learning on verifiable rewards (GRPO-style policy gradient with a group baseline).

    nanoforge train rl --from checkpoints/sft/demo --data arithmetic --tag demo

Each step samples `rl.group_size` completions for each of `rl.prompts_per_step` prompts per process through
the engine (tool calls run; their forced output tokens get mask 0 and no gradient), rewards each by a
verifiable check (the extracted `#### n` answer equals the reference; optionally a small format reward),
and minimises

    loss = Σ_i Σ_t  A_i · (−log π(a_it)) · m_it  /  Σ m      A_i = r_i − mean(r of i's group) [/ std]

where the denominator counts the sampled tokens of the whole step, across micro-batches and processes, so
accumulation and DDP do not change the gradient. Written with nats = −log π this is the weighted
cross-entropy the training loop already computes, with the advantage as the token weight. An optional
KL penalty to the starting model (`rl.kl_coef`, the k3 estimator) keeps the policy near it.
Groups whose rewards are all equal carry no signal: their advantages are exactly 0.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanoforge.errors import UserError

SOURCE_PHASES = ("sft", "mid", "rl")


def train_rl(from_checkpoint: str | Path, data: str | Path | Sequence[Any] | None = None, *, tag: str,
             val: str | Path | Sequence[Any] | None = None, config: str | Path | None = None,
             overrides: Sequence[str] = (), run: str | None = None, resume: bool = False,
             allow_base: bool = False, own_run: bool = False) -> dict[str, Any]:
    """RL from the chat checkpoint `from_checkpoint` on the problems of `data` (a file, a mixture TOML, a
    folder with train/ and val/ splits, or loaded conversations; None or "default": the offline default
    chat data, whose arithmetic word problems are the ones with answers); checkpoints go to checkpoints/rl/<tag>/. Held-out prompts: `val`, else the val/ split, else
    rl.eval_prompts problems held out of `data`. Returns the loop's summary plus pass@1 / pass@k / their
    standard error before (`*_start`) and after RL, the last step's reward and zero-variance fraction.
    Refuses (UserError): a base checkpoint (RL wants a chat model; `allow_base` turns that into a
    warning), a checkpoint whose tokenizer is missing or changed, model.* settings, data without an
    answer to check."""
    from nanoforge import checkpoint as ckpt
    from nanoforge import home, progress
    from nanoforge.train.loop import train
    from nanoforge.train.sft import checkpoint_tokenizer, phase_config

    folder, step, meta = ckpt.load_meta(from_checkpoint)
    phase = meta.get("phase", "base")
    if phase not in SOURCE_PHASES:
        msg = (f"--from {from_checkpoint} is a {phase} checkpoint: RL wants a chat model (train one with "
               f"`nanoforge train sft --from {from_checkpoint} ...`)")
        if not allow_base:
            raise UserError(msg + "; --allow-base starts from it anyway")
        progress.warn(msg + "; starting from it anyway (--allow-base)")
    tokenizer = checkpoint_tokenizer(meta, str(folder))
    cfg = phase_config(meta, "rl", config=config, overrides=overrides)
    rc = cfg.rl
    train_src, val_src, where, val_where = _rl_sources(data if data is not None else (rc.data or None), val)
    problems = problems_from_conversations(_load(train_src), tokenizer, where=where)
    held_out = problems_from_conversations(_load(val_src), tokenizer, where=val_where) if val_src is not None else []
    if not held_out and len(problems) > 1:
        k = min(rc.eval_prompts, len(problems) // 5 or 1)
        order = random.Random(cfg.train.seed).sample(range(len(problems)), len(problems))
        keep = set(order[k:])
        held_out = [p for i, p in enumerate(problems) if i not in keep]
        problems = [p for i, p in enumerate(problems) if i in keep]
        val_where = f"{k} problems held out of {where}"
    held_out = held_out[:rc.eval_prompts]
    source = RLData(tokenizer, problems, held_out, rl=rc, base=(folder, step, meta), data=where,
                    held_out_source=val_where)
    ckpt_dir = home.checkpoint_dir("rl", tag)
    existing = ckpt.checkpoint_steps(ckpt_dir)
    if resume and existing:
        last = home.read_json(ckpt_dir / f"meta_{existing[-1]:06d}.json", "checkpoint meta")
        source.start_scores = dict(last.get("start_val") or {})
        source.start_correct = last.get("start_correct")
    summary = train(cfg, data=source, tag=tag, run=run, phase="rl", resume=resume, own_run=own_run)
    if source.no_signal_steps and source.no_signal_steps == source.steps_run and summary.get("rank", 0) == 0:
        progress.warn(f"no reward signal in any of the {source.steps_run} steps: every group's samples were all "
                      f"right or all wrong, so the gradient was 0 (RL sharpens what the model can sometimes do; "
                      f"train SFT longer, or raise rl.group_size / rl.temperature)")
    summary.update({f"{k}_start": v for k, v in source.start_scores.items()})
    summary.update({"k": rc.eval_samples, "group_size": rc.group_size, "problems": len(problems),
                    "held_out": len(held_out), "from": f"{folder} step {step}",
                    **{k: source.last[k] for k in ("reward_mean", "zero_variance_frac") if k in source.last}})
    return summary


def _rl_sources(data: Any, val: Any) -> tuple[Any, Any, str, str]:
    """(train source, held-out source or None, their names) for `data`/`val` as train_rl takes them."""
    if data is None or str(data) in ("", "default"):
        from nanoforge.data.chat import default_chat_data

        data = default_chat_data()
    if isinstance(data, (list, tuple)):
        return data, val, "conversations", "held-out conversations" if val is not None else ""
    path = Path(data)
    if val is None and path.is_dir() and (path / "train").is_dir():
        return path / "train", (path / "val" if (path / "val").is_dir() else None), str(path / "train"), \
            str(path / "val")
    return data, val, str(data), str(val) if val is not None else ""


def _load(source: Any) -> list[Any]:
    if isinstance(source, (list, tuple)):
        return list(source)
    from nanoforge.data.chat import load_conversations

    return list(load_conversations(source))


# --- the loss --------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, *, normalize_std: bool = False, positive_only: bool = False,
                     eps: float = 1e-6) -> torch.Tensor:
    """Advantages for rewards shaped [groups, group_size]: reward − the group's mean, divided by the group's
    standard deviation (+eps) when `normalize_std`, negative ones set to 0 when `positive_only` (only the
    completions that beat their group are reinforced: the gradient of filtered, reward-weighted likelihood,
    which does not push probability away from the failures onto everything else). A group of equal
    rewards gives exactly zeros."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [groups, group_size], got shape {tuple(rewards.shape)}")
    rewards = rewards.float()
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if normalize_std and rewards.shape[1] > 1:
        adv = adv / (rewards.std(dim=1, keepdim=True) + eps)
    return adv.clamp(min=0.0) if positive_only else adv


def policy_gradient_loss(nats: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                         num_tokens: float | torch.Tensor, *, ref_nats: torch.Tensor | None = None,
                         kl_coef: float = 0.0) -> torch.Tensor:
    """The step's policy-gradient loss contributed by one micro-batch.

    nats [B, T]: −log π of each target token; mask [B, T]: 1 on sampled tokens (0 on prompts, padding and
    forced tool output); advantages [B]: one per sequence; num_tokens: the sampled tokens of the *whole*
    step (all micro-batches and processes), so summing the micro-batches' losses gives the step's mean.
    ref_nats [B, T] (the starting model's, no grad) with kl_coef > 0 adds kl_coef × the k3 estimate of
    KL(π ‖ π_ref) per sampled token, normalised the same way."""
    m = mask.to(nats.dtype)
    loss = (advantages.to(nats.dtype).unsqueeze(1) * nats * m).sum()
    if kl_coef and ref_nats is not None:
        log_ratio = nats - ref_nats.detach()  # log π_ref − log π
        kl = torch.exp(log_ratio) - log_ratio - 1
        loss = loss + kl_coef * (kl * m).sum()
    return loss / num_tokens


def token_nats(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
    """−log π(target) per position [B, T] (0 where mask is 0), through the model's forward so DDP hooks run."""
    nats, _scored = model(inputs, targets, mask.bool(), reduction="none")
    return nats


# --- rewards ---------------------------------------------------------------------------------------------
def normalize_answer(s: str | None) -> str | None:
    """'1,234' -> '1234', '12.0' -> '12', '-3.50' -> '-3.5', ' 7 ' -> '7'; None stays None."""
    if s is None:
        return None
    t = s.strip().replace(",", "").rstrip(".")
    try:
        value = float(t)
    except ValueError:
        return t
    if math.isfinite(value) and value == int(value):
        return str(int(value))
    return repr(value) if math.isfinite(value) else t


def extract_answer(text: str) -> str | None:
    """The `#### n` answer of a completion (the chat data's extraction), normalised."""
    return normalize_answer(_gsm8k(text))


def answer_reward(text: str, answer: str, *, format_weight: float = 0.0) -> float:
    """1.0 when the completion's extracted `#### n` equals `answer` (numbers compared normalised), else 0;
    with `format_weight` > 0, a wrong answer that still has the `#### n` form earns `format_weight`."""
    got = extract_answer(text)
    if got is not None and got == normalize_answer(answer):
        return 1.0
    return format_weight if (got is not None and format_weight > 0) else 0.0


# --- data --------------------------------------------------------------------------------------------------
@dataclass
class Problem:
    """A prompt to complete (rendered ids, ending with <|assistant_start|>) and its checkable answer."""

    prompt_ids: list[int]
    answer: str
    source: str  # file:line, for error messages and reports
    question: str = ""


def problems_from_conversations(conversations: Sequence[Any], tokenizer: Any, *, where: str) -> list[Problem]:
    """Problems from chat conversations whose last assistant turn ends in a `#### n` answer (GSM8K shape, the
    synthetic arithmetic data). Refuses data where no conversation has an answer to check."""
    problems = []
    for conv in conversations:
        messages = conv["messages"] if isinstance(conv, dict) else getattr(conv, "messages", conv)
        source = str(getattr(conv, "source", "") or (conv.get("source", "") if isinstance(conv, dict) else ""))
        if not messages or messages[-1].get("role") != "assistant":
            continue
        answer = normalize_answer(_gsm8k(_content_text(messages[-1].get("content"))))
        if answer is None:
            continue
        prompt_ids = tokenizer.render_for_completion({"messages": list(messages)})
        question = next((_content_text(m.get("content")) for m in messages if m.get("role") == "user"), "")
        problems.append(Problem(list(prompt_ids), answer, source or where, question))
    if not problems:
        raise UserError(f"RL data {where}: no conversation ends with an assistant answer of the form "
                        f"'#### <number>' to check rewards against (GSM8K-shaped data or the arithmetic set)")
    return problems


def _gsm8k(text: str) -> str | None:
    from nanoforge.data.chat import gsm8k_answer

    return gsm8k_answer(text)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


class PromptSampler:
    """Deterministic prompt order: a fresh seeded shuffle per epoch; process r of w takes every w-th prompt
    of the shuffled list (disjoint across ranks). State = (epoch, position), so resume continues exactly."""

    def __init__(self, n: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if n < world_size:
            raise UserError(f"RL data has {n} prompts for {world_size} processes: each process needs at least one")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world_size
        self.epoch, self.pos = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order[self.rank::self.world][: self.n // self.world]  # equal shares: ranks step together

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._shuffle()


def step_seed(seed: int, step: int, rank: int) -> int:
    """The sampling seed of one step on one process: a function of (seed, step, rank), so a resumed run
    draws exactly the completions the uninterrupted one would have."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**31 - 1)


def eval_seed(seed: int, rank: int) -> int:
    """The sampling seed of the held-out evaluation on one process: the same at every evaluation (so the
    gain is paired), offset by 2**30 from the rollout seeds of `step_seed`."""
    return (seed * 1_000_003 + 2**30 + rank * 104_729) % (2**31 - 1)


# --- rollouts ----------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """One sampled completion of a problem: ids (sampled and forced), mask (1 sampled), reward."""

    problem: int
    ids: list[int]
    mask: list[int]
    reward: float
    text: str
    finish_reason: str


def sample_rollouts(engine: Any, problems: Sequence[Problem], indices: Sequence[int], params: Any,
                    group_size: int, *, format_weight: float = 0.0,
                    reward_fn: Callable[[str, str], float] | None = None) -> list[Rollout]:
    """`group_size` completions per problem (grouped, in `indices` order), rewarded."""
    prompts = [problems[i].prompt_ids for i in indices]
    completions = engine.generate(prompts, params, n=group_size)
    out = []
    for j, c in enumerate(completions):
        idx = indices[j // group_size]
        text = c.text
        r = (reward_fn(text, problems[idx].answer) if reward_fn is not None
             else answer_reward(text, problems[idx].answer, format_weight=format_weight))
        out.append(Rollout(idx, list(c.ids), list(c.mask), float(r), text, c.finish_reason))
    return out


def rollout_batches(rollouts: Sequence[Rollout], problems: Sequence[Problem], advantages: Sequence[float],
                    batch_size: int, device: torch.device | str = "cpu", pad_id: int = 0
                    ) -> list[dict[str, torch.Tensor]]:
    """Micro-batches {inputs, targets, mask, advantages} of prompt + completion sequences: targets are the
    sequence shifted by one; mask is 1 exactly at targets that were sampled (never the prompt, padding or
    forced tool output). Every rollout gets a row (one without a sampled token adds nothing to the loss), so
    every process has the same number of micro-batches."""
    rows = []
    for ro, adv in zip(rollouts, advantages):
        prompt = problems[ro.problem].prompt_ids
        seq = list(prompt) + list(ro.ids)
        m = [0] * len(prompt) + [int(x) for x in ro.mask]
        rows.append((seq[:-1], seq[1:], m[1:], float(adv)))
    batches = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        T = max(len(r[0]) for r in chunk)
        inputs = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        targets = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.bool)
        for b, (x, y, m, _a) in enumerate(chunk):
            inputs[b, :len(x)] = torch.tensor(x)
            targets[b, :len(y)] = torch.tensor(y)
            mask[b, :len(m)] = torch.tensor(m, dtype=torch.bool)
        adv = torch.tensor([r[3] for r in chunk], dtype=torch.float32)
        batches.append({k: v.to(device) for k, v in
                        {"inputs": inputs, "targets": targets, "mask": mask, "advantages": adv}.items()})
    return batches


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from n samples of which c are correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


# --- the RL data source of the training loop --------------------------------------------------------------
ASSISTANT_END = "<|assistant_end|>"


class RLPrompts:
    """The loop's "loader" for RL: the prompt sampler, whose state goes into checkpoints."""

    def __init__(self, sampler: PromptSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> RLPrompts:
        return self

    def __next__(self) -> Any:
        raise TypeError("RL micro-batches come from RLData.step_batches, not from iterating the loader")

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


class RLData:
    """RL for the training loop (the data-source interface of train/loop.py's TokenData, plus
    `step_batches`, `micro_loss` and `step_metrics`): each step samples its rollouts through the engine,
    then the loop accumulates `micro_loss` over the micro-batches and steps the optimizer.
    `evaluate` gives pass@1 / pass@k on the held-out prompts."""

    kind = "RL prompts"

    def __init__(self, tokenizer: Any, problems: list[Problem], held_out: list[Problem], *, rl: Any,
                 base: tuple[Any, int, dict[str, Any]], data: str, held_out_source: str) -> None:
        self.tokenizer, self.problems, self.held_out, self.rc = tokenizer, problems, held_out, rl
        self.base_folder, self.base_step, self.base_meta = base
        self.data, self.held_out_source = data, held_out_source
        self.start_scores: dict[str, Any] = {}
        self.start_correct: list[int] | None = None  # correct samples of each held-out problem at the start
        self.last: dict[str, Any] = {}
        self.steps_run = self.no_signal_steps = 0  # in this process (for the no-signal warning)
        self.ref: torch.nn.Module | None = None
        self._engine: Any = None
        self._engine_model: Any = None
        self.seed = 0
        self.pad_id = tokenizer.special_id(ASSISTANT_END)

    # --- the data-source interface -----------------------------------------------------------------
    def prepare(self, cfg: Any) -> None:
        self.seed, self._batch_size = cfg.train.seed, cfg.train.device_batch_size

    def describe(self) -> str:
        return f"RL data {self.data}"

    def init_weights(self, model: torch.nn.Module) -> None:
        from nanoforge import checkpoint as ckpt

        ckpt.load_weights(model, ckpt.load_state_dict(self.base_folder, self.base_step),
                          where=f"{self.base_folder} step {self.base_step}")

    def default_steps(self, cfg: Any, world_size: int) -> int:
        return self.rc.max_steps

    def loader(self, cfg: Any, info: Any, device: torch.device) -> RLPrompts:
        if info.enabled and cfg.train.parallel == "fsdp":
            raise UserError("train rl samples with the whole model on every process: use train.parallel=ddp")
        self.info, self.device = info, device
        if self.rc.kl_coef > 0:
            from nanoforge import checkpoint as ckpt

            self.ref, _ = ckpt.load_model(self.base_folder, device=device, step=self.base_step)
            self.ref.requires_grad_(False)
        return RLPrompts(PromptSampler(len(self.problems), seed=cfg.train.seed, rank=info.rank,
                                       world_size=info.world_size))

    def evaluate(self, model: torch.nn.Module, cfg: Any, info: Any, device: torch.device,
                 autocast: Any) -> dict[str, float]:
        """pass@1 and pass@k on the held-out problems (split across ranks), k = rl.eval_samples samples each
        at rl.temperature with a fixed seed, and the standard error of pass@1 over problems."""
        from nanoforge import dist as D

        rc = self.rc
        k = rc.eval_samples
        mine = list(range(len(self.held_out)))[info.rank::info.world_size]
        correct: list[int] = []
        if mine:
            rollouts = self._generate(D.unwrap(model), mine, self.held_out,
                                      self._params(eval_seed(self.seed, info.rank)), k)
            correct = [sum(r.reward >= 1.0 for r in rollouts[i * k:(i + 1) * k]) for i in range(len(mine))]
        # the gain over the starting model is paired: the same problems at the same seed, so its standard
        # error is that of the per-problem differences (smaller than either score's: problems differ in
        # difficulty far more than the two models do)
        first = self.start_correct is None
        if first:  # every rank keeps the whole list (so does a resumed run, from the checkpoint's meta)
            full = torch.zeros(len(self.held_out), dtype=torch.float64)
            full[mine] = torch.tensor(correct, dtype=torch.float64)
            self.start_correct = [int(c) for c in _all_sum(full, info, device).tolist()]
        d = [(c - self.start_correct[i]) / k for i, c in zip(mine, correct)]
        local = torch.tensor([sum(c / k for c in correct), sum((c / k) ** 2 for c in correct),
                              sum(pass_at_k(k, c, k) for c in correct), float(len(correct)),
                              sum(d), sum(x * x for x in d)], dtype=torch.float64)
        s1, s2, sk, n, g1, g2 = _all_sum(local, info, device).tolist()
        n = max(n, 1.0)

        def stderr(total: float, squares: float) -> float:
            mean = total / n
            return math.sqrt(max(squares / n - mean * mean, 0.0) / max(n - 1, 1.0))

        out = {"pass@1": round(s1 / n, 6), f"pass@{k}": round(sk / n, 6), "pass@1_stderr": round(stderr(s1, s2), 6)}
        if not first:
            out.update({"pass@1_gain": round(g1 / n, 6), "pass@1_gain_stderr": round(stderr(g1, g2), 6)})
        return out

    def sample(self, model: torch.nn.Module, cfg: Any) -> list[dict[str, str]]:
        """Greedy replies to the first held-out prompts."""
        rollouts = self._generate(model, list(range(min(3, len(self.held_out)))), self.held_out,
                                  self._params(0, temperature=0.0), 1)
        return [{"prompt": self.held_out[r.problem].question, "completion": r.text} for r in rollouts]

    def meta(self) -> dict[str, Any]:
        return {"from": {"path": str(self.base_folder), "step": self.base_step, "phase": self.base_meta.get("phase")},
                "data": self.data, "val_data": self.held_out_source, "problems": len(self.problems),
                "held_out": len(self.held_out), "start_val": self.start_scores,
                "start_correct": self.start_correct}

    # --- the RL step --------------------------------------------------------------------------------
    def step_batches(self, step: int, loader: RLPrompts, model: torch.nn.Module) -> list[tuple[torch.Tensor, ...]]:
        """Sample step `step`'s rollouts with the current weights: micro-batches (inputs, targets, mask,
        advantages) of train.device_batch_size sequences; every rank gets the same number of them."""
        import time

        from nanoforge import dist as D

        rc, info = self.rc, self.info
        raw = D.unwrap(model)
        if step == 0 and not self.start_scores and len(self.held_out):
            self.start_scores = self.evaluate(model, None, info, self.device, None)  # the SFT model's scores
        t0 = time.perf_counter()
        indices = loader.sampler.take(rc.prompts_per_step)
        rollouts = self._generate(raw, indices, self.problems, self._params(step_seed(self.seed, step, info.rank)),
                                  rc.group_size)
        rewards = torch.tensor([r.reward for r in rollouts]).view(len(indices), rc.group_size)
        adv = group_advantages(rewards, normalize_std=rc.normalize_std, positive_only=rc.positive_only)
        batches = rollout_batches(rollouts, self.problems, adv.flatten().tolist(), self._batch_size,
                                  self.device, pad_id=self.pad_id)
        local = torch.tensor([float(sum(sum(r.mask) for r in rollouts)), rewards.sum().item(), float(rewards.numel()),
                              float((rewards.max(1).values == rewards.min(1).values).sum()), float(len(indices)),
                              float(sum(len(r.ids) for r in rollouts)),
                              float(sum(r.finish_reason == "stop" for r in rollouts))], dtype=torch.float64)
        total = _all_sum(local, info, self.device)
        n = max(total[2].item(), 1.0)
        self.last = {"reward_mean": round(total[1].item() / n, 6),
                     "zero_variance_frac": round(total[3].item() / max(total[4].item(), 1.0), 6),
                     "sampled_tokens": int(total[0].item()), "completion_len": round(total[5].item() / n, 3),
                     "stop_frac": round(total[6].item() / n, 6), "rollout_time": round(time.perf_counter() - t0, 4)}
        if step == 0 and self.start_scores:
            self.last.update({f"start_{k}": v for k, v in self.start_scores.items()})
        self.steps_run += 1
        self.no_signal_steps += self.last["zero_variance_frac"] == 1.0
        return [(b["inputs"], b["targets"], b["mask"], b["advantages"]) for b in batches]

    def micro_loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, ...], scale: float) -> torch.Tensor:
        """A micro-batch's share of the step's loss; `scale` = processes / sampled tokens of the whole step
        (DDP averages the gradients over processes, so the average is the global sum / the global count)."""
        inputs, targets, mask, advantages = batch
        nats = token_nats(model, inputs, targets, mask)
        ref_nats = None
        if self.ref is not None:
            with torch.no_grad():
                ref_nats = token_nats(self.ref, inputs, targets, mask)
        return policy_gradient_loss(nats, mask, advantages, 1.0 / scale, ref_nats=ref_nats, kl_coef=self.rc.kl_coef)

    def step_metrics(self) -> dict[str, Any]:
        return dict(self.last)

    # --- helpers ------------------------------------------------------------------------------------
    _batch_size = 16

    def _params(self, seed: int, temperature: float | None = None) -> Any:
        from nanoforge.infer.engine import SamplingParams

        rc = self.rc
        return SamplingParams(temperature=rc.temperature if temperature is None else temperature,
                              top_k=rc.top_k or None, seed=seed, max_tokens=rc.max_new_tokens)

    @torch.no_grad()
    def _generate(self, raw: torch.nn.Module, indices: Sequence[int], problems: Sequence[Problem], params: Any,
                  n: int) -> list[Rollout]:
        from nanoforge.infer.engine import Engine

        if self._engine_model is not raw:
            rows = self.rc.sample_batch or self.rc.prompts_per_step * self.rc.group_size
            self._engine, self._engine_model = Engine(raw, self.tokenizer, max_batch=rows), raw
        was = raw.training
        raw.eval()
        try:
            return sample_rollouts(self._engine, problems, indices, params, n, format_weight=self.rc.format_reward)
        finally:
            raw.train(was)


def _all_sum(t: torch.Tensor, info: Any, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sum of `t` over ranks (NCCL needs the tensor on the GPU; the result comes back to the CPU)."""
    if getattr(info, "enabled", False):
        import torch.distributed as dist

        t = t.to(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()
