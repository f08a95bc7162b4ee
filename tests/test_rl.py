"""RL: the policy-gradient loss against hand-computed REINFORCE-with-baseline gradients, masks, rewards."""

from __future__ import annotations

import pytest
import torch

from nanoforge.train.rl import (
    Problem,
    PromptSampler,
    Rollout,
    group_advantages,
    pass_at_k,
    policy_gradient_loss,
    rollout_batches,
    step_seed,
    token_nats,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class SoftmaxPolicy(torch.nn.Module):
    """π(a) = softmax(θ)[a] whatever the context: ∇θ log π(a) = onehot(a) − softmax(θ), by hand."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.randn(vocab, generator=torch.Generator().manual_seed(seed)))

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *, reduction: str) -> tuple:
        logp = torch.log_softmax(self.theta, dim=0)[targets]
        nats = torch.where(mask, -logp, torch.zeros_like(logp))
        return nats, mask.float()


def _rollouts(rewards: list[list[float]], vocab: int, seed: int = 1) -> tuple[list[Problem], list[Rollout]]:
    g = torch.Generator().manual_seed(seed)
    problems, rollouts = [], []
    for p, group in enumerate(rewards):
        problems.append(Problem(prompt_ids=torch.randint(vocab, (3 + p,), generator=g).tolist(), answer="1",
                                source=f"toy:{p}"))
        for r in group:
            n = int(torch.randint(2, 7, (1,), generator=g))
            ids = torch.randint(vocab, (n,), generator=g).tolist()
            mask = [1] * n
            if n > 3:  # a forced tool-output stretch in the middle
                mask[1:3] = [0, 0]
            rollouts.append(Rollout(p, ids, mask, r, "", "stop"))
    return problems, rollouts


def _our_gradient(model: torch.nn.Module, problems: list[Problem], rollouts: list[Rollout], adv: torch.Tensor,
                  batch_size: int, **kw: object) -> torch.Tensor:
    model.zero_grad()
    batches = rollout_batches(rollouts, problems, adv.flatten().tolist(), batch_size)
    total = sum(int(b["mask"].sum()) for b in batches)
    for b in batches:
        nats = token_nats(model, b["inputs"], b["targets"], b["mask"])
        policy_gradient_loss(nats, b["mask"], b["advantages"], total, **kw).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_gradient_equals_hand_computed_reinforce_with_baseline() -> None:
    V = 11
    rewards = [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0], [0.5, 0.0, 1.0, 1.0]]
    problems, rollouts = _rollouts(rewards, V)
    policy = SoftmaxPolicy(V)
    adv = group_advantages(torch.tensor(rewards))
    # by hand: ∇ loss = −(1/N) Σ_i A_i Σ_{t sampled} (onehot(a_it) − p), N = sampled tokens of the step
    p = torch.softmax(policy.theta.detach(), dim=0)
    n_tokens = sum(sum(r.mask) for r in rollouts)
    expected = torch.zeros(V)
    for ro, a in zip(rollouts, adv.flatten().tolist()):
        baseline = sum(r.reward for r in rollouts if r.problem == ro.problem) / 4
        assert a == pytest.approx(ro.reward - baseline)
        for tok, m in zip(ro.ids, ro.mask):
            if m:
                expected -= a * (torch.nn.functional.one_hot(torch.tensor(tok), V).float() - p)
    expected /= n_tokens
    for batch_size in (12, 5, 1):  # one micro-batch, uneven micro-batches, one sequence each: same gradient
        got = _our_gradient(policy, problems, rollouts, adv, batch_size)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert expected.abs().max() > 1e-3


def test_gradient_on_a_tiny_llama_equals_a_direct_reinforce_surrogate() -> None:
    from nanoforge.config import preset_model
    from nanoforge.model import LLaMA

    torch.manual_seed(0)
    model = LLaMA(preset_model("ci"))
    V = model.config.vocab_size
    rewards = [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    problems, rollouts = _rollouts(rewards, V, seed=3)
    adv = group_advantages(torch.tensor(rewards), normalize_std=True)
    ours = _our_gradient(model, problems, rollouts, adv, batch_size=2)

    # REINFORCE with baseline written directly: one sequence at a time, log_softmax of the logits
    model.zero_grad()
    n_tokens = sum(sum(r.mask) for r in rollouts)
    surrogate = torch.zeros(())
    for ro, a in zip(rollouts, adv.flatten().tolist()):
        seq = torch.tensor([problems[ro.problem].prompt_ids + ro.ids])
        logp = torch.log_softmax(model(seq[:, :-1]), dim=-1)[0]
        start = len(problems[ro.problem].prompt_ids) - 1
        for t, (tok, m) in enumerate(zip(ro.ids, ro.mask)):
            if m:
                surrogate = surrogate + a * logp[start + t, tok]
    (-surrogate / n_tokens).backward()
    direct = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(ours, direct, rtol=1e-4, atol=1e-7)


def test_tool_output_tokens_get_no_gradient() -> None:
    V = 7
    problems, rollouts = _rollouts([[1.0, 0.0, 0.0]], V, seed=5)
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0]]))
    policy = SoftmaxPolicy(V)
    before = _our_gradient(policy, problems, rollouts, adv, 3)
    # change every forced (mask 0) token: the gradient must not move
    changed = [Rollout(r.problem, [t if m else (t + 1) % V for t, m in zip(r.ids, r.mask)], r.mask, r.reward, "",
                       "stop") for r in rollouts]
    assert any(0 in r.mask for r in rollouts) and [r.ids for r in changed] != [r.ids for r in rollouts]
    torch.testing.assert_close(_our_gradient(policy, problems, changed, adv, 3), before, rtol=0, atol=0)
    batch = rollout_batches(rollouts, problems, adv.flatten().tolist(), 8)[0]
    # the mask marks exactly the sampled completion tokens (never the prompt)
    assert int(batch["mask"].sum()) == sum(sum(r.mask) for r in rollouts)


def test_equal_rewards_give_zero_gradient() -> None:
    V = 9
    rewards = [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    problems, rollouts = _rollouts(rewards, V, seed=2)
    for norm in (False, True):
        adv = group_advantages(torch.tensor(rewards), normalize_std=norm)
        assert torch.equal(adv, torch.zeros_like(adv))
        grad = _our_gradient(SoftmaxPolicy(V), problems, rollouts, adv, 4)
        assert torch.equal(grad, torch.zeros_like(grad))


def test_positive_only_trains_on_the_group_winners_alone() -> None:
    rewards = [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]
    adv = group_advantages(torch.tensor(rewards), positive_only=True)
    assert adv.tolist() == [[0.5, 0.0, 0.0, 0.5], [0.0, 0.75, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    normed = group_advantages(torch.tensor(rewards), normalize_std=True, positive_only=True)
    full = group_advantages(torch.tensor(rewards), normalize_std=True)
    assert torch.equal(normed, full.clamp(min=0)) and (full < 0).any()
    # the failures' sampled tokens no longer move the gradient (same lengths, so the same token count)
    V = 8
    problems, rollouts = _rollouts(rewards, V, seed=6)
    policy = SoftmaxPolicy(V)
    before = _our_gradient(policy, problems, rollouts, adv, 4)
    changed = [r if r.reward >= 1.0 else Rollout(r.problem, [(t + 1) % V if m else t for t, m in zip(r.ids, r.mask)],
                                                  r.mask, r.reward, "", "stop") for r in rollouts]
    assert [r.ids for r in changed] != [r.ids for r in rollouts]
    torch.testing.assert_close(_our_gradient(policy, problems, changed, adv, 4), before, rtol=0, atol=0)
    assert before.abs().sum() > 0


def test_kl_penalty_is_zero_at_the_reference_and_pulls_back_after_a_change() -> None:
    V = 6
    problems, rollouts = _rollouts([[1.0, 1.0]], V, seed=4)  # equal rewards: only the KL term is left
    adv = group_advantages(torch.tensor([[1.0, 1.0]]))
    policy = SoftmaxPolicy(V)
    batch = rollout_batches(rollouts, problems, adv.flatten().tolist(), 4)[0]
    ref = token_nats(policy, batch["inputs"], batch["targets"], batch["mask"]).detach()
    grad = _our_gradient(policy, problems, rollouts, adv, 4, ref_nats=ref, kl_coef=0.5)
    assert torch.equal(grad, torch.zeros_like(grad))
    with torch.no_grad():
        policy.theta[0] += 2.0
    nats = token_nats(policy, batch["inputs"], batch["targets"], batch["mask"])
    loss = policy_gradient_loss(nats, batch["mask"], batch["advantages"], int(batch["mask"].sum()), ref_nats=ref,
                                kl_coef=0.5)
    assert loss.item() > 0


def test_prompt_sampler_is_disjoint_across_ranks_and_resumes_exactly() -> None:
    a, b = PromptSampler(10, seed=3, rank=0, world_size=2), PromptSampler(10, seed=3, rank=1, world_size=2)
    first_a, first_b = a.take(5), b.take(5)
    assert not set(first_a) & set(first_b) and sorted(first_a + first_b) == list(range(10))
    a.take(3)
    state = a.state_dict()
    rest = a.take(6)
    c = PromptSampler(10, seed=3, rank=0, world_size=2)
    c.load_state_dict(state)
    assert c.take(6) == rest
    assert step_seed(1, 2, 0) != step_seed(1, 3, 0) != step_seed(1, 2, 1)


def test_pass_at_k_matches_the_combinatorial_definition() -> None:
    from math import comb

    for n, c, k in [(8, 0, 1), (8, 3, 1), (8, 3, 4), (5, 5, 2), (10, 1, 10)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))


# --- train rl end to end (tiny random model; the reward is made to vary so that the gradient is not 0) --------
def _arithmetic(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        out.append({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                 {"role": "assistant", "content": f"{a} + {b} = {a + b}.\n#### {a + b}"}]})
    return out


@pytest.fixture
def sft_checkpoint(tmp_path):
    from _eval_helpers import make_checkpoint, make_tokenizer

    from nanoforge import home
    from nanoforge.checkpoint import load_meta, load_state_dict, save_checkpoint

    base = make_checkpoint(tmp_path, make_tokenizer(tmp_path))
    folder, step, meta = load_meta(base)
    meta = {**meta, "phase": "sft", "config": {"train": {"device_batch_size": 4, "seq_len": 64,
                                                         "total_batch_tokens": 512, "lr": 3e-3}}}
    out = home.checkpoint_dir("sft", "tiny")
    save_checkpoint(out, step, load_state_dict(folder, step), None, meta)
    return base, out


FAST_RL = ["rl.max_steps=4", "rl.prompts_per_step=2", "rl.group_size=3", "rl.max_new_tokens=6",
           "rl.eval_prompts=4", "rl.eval_samples=2", "train.eval_every=2", "rl.lr_scale=30"]


def _vary_reward(monkeypatch) -> None:
    import nanoforge.train.rl as rl

    monkeypatch.setattr(rl, "answer_reward", lambda text, answer, format_weight=0.0: float(len(text) % 3 == 0))


def _weights(tag: str) -> dict:
    from nanoforge import home
    from nanoforge.checkpoint import checkpoint_steps, load_state_dict

    folder = home.checkpoint_dir("rl", tag)
    return load_state_dict(folder, checkpoint_steps(folder)[-1])


def test_train_rl_interrupted_and_resumed_equals_an_uninterrupted_run(sft_checkpoint, monkeypatch) -> None:
    import json
    import os
    import signal

    import nanoforge.train.rl as rl
    from nanoforge import home

    _, sft = sft_checkpoint
    _vary_reward(monkeypatch)
    data, val = _arithmetic(12, 0), _arithmetic(4, 1)
    full = rl.train_rl(sft, data, val=val, tag="full", overrides=FAST_RL)
    assert full["step"] == 4 and not full["interrupted"]
    assert {"pass@1", "pass@2", "pass@1_stderr", "pass@1_start"} <= set(full)

    real = rl.RLData.step_metrics

    def interrupt_after_step_2(self):
        if self.last.get("_step", 0) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        self.last["_step"] = self.last.get("_step", 0) + 1
        return {k: v for k, v in real(self).items() if k != "_step"}

    monkeypatch.setattr(rl.RLData, "step_metrics", interrupt_after_step_2)
    cut = rl.train_rl(sft, data, val=val, tag="cut", overrides=FAST_RL)
    assert cut["interrupted"] == signal.SIGINT and cut["step"] == 2
    monkeypatch.setattr(rl.RLData, "step_metrics", real)
    resumed = rl.train_rl(sft, data, val=val, tag="cut", overrides=FAST_RL, resume=True)
    assert resumed["step"] == 4
    # the paired gain: same problems, so it is the difference of the scores; the resumed run still has the
    # starting model's per-problem results (from the checkpoint) to pair with
    assert full["pass@1_gain"] == pytest.approx(full["pass@1"] - full["pass@1_start"], abs=2e-6)
    assert resumed["pass@1_gain"] == full["pass@1_gain"] and resumed["pass@1_gain_stderr"] == full["pass@1_gain_stderr"]

    a, b = _weights("full"), _weights("cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    start = load_state_dict_of(sft)
    assert any(not torch.equal(a[k], start[k]) for k in a)  # RL moved the weights

    def rows(tag: str) -> list[dict]:
        lines = (home.run_dir(f"rl-{tag}") / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if "time" not in k and "per_second" not in k
                 and k != "mfu"} for line in lines]

    assert rows("full") == rows("cut")
    assert [r["step"] for r in rows("full")] == [1, 2, 3, 4]
    assert 0 <= rows("full")[0]["zero_variance_frac"] <= 1 and "reward_mean" in rows("full")[0]


def load_state_dict_of(folder):
    from nanoforge.checkpoint import checkpoint_steps, load_state_dict

    return load_state_dict(folder, checkpoint_steps(folder)[-1])


def test_rl_trainable_moves_only_the_named_parameters(sft_checkpoint, monkeypatch) -> None:
    """rl.trainable = ["norm.weight"]: the final norm's gains change, every other tensor stays bit for bit
    the SFT model's (frozen: no gradient, no optimizer state); a pattern that matches nothing is refused."""
    import nanoforge.train.rl as rl
    from nanoforge import home
    from nanoforge.checkpoint import checkpoint_steps, load_optimizer_state
    from nanoforge.errors import UserError

    _, sft = sft_checkpoint
    _vary_reward(monkeypatch)
    data, val = _arithmetic(12, 0), _arithmetic(4, 1)
    out = rl.train_rl(sft, data, val=val, tag="final-norm",
                      overrides=[*FAST_RL, "rl.trainable=norm.weight", "rl.norm_lr=0.5"])
    assert out["step"] == 4
    after, start = _weights("final-norm"), load_state_dict_of(sft)
    moved = sorted(k for k in after if not torch.equal(after[k], start[k]))
    assert moved == ["norm.weight"]
    folder = home.checkpoint_dir("rl", "final-norm")
    state = load_optimizer_state(folder, checkpoint_steps(folder)[-1])
    assert len(state["state"]) == 1  # AdamW moments for the one trained tensor only
    with pytest.raises(UserError, match="'layers.*.nothing' matches no parameter of the model"):
        rl.train_rl(sft, data, val=val, tag="bad", overrides=[*FAST_RL, "rl.trainable=layers.*.nothing"])


def test_train_rl_refuses_bad_input(sft_checkpoint) -> None:
    from nanoforge.errors import UserError
    from nanoforge.train.rl import train_rl

    base, sft = sft_checkpoint
    with pytest.raises(UserError, match="base checkpoint: RL wants a chat model"):
        train_rl(base, _arithmetic(4, 0), tag="x", overrides=FAST_RL)
    no_answers = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    with pytest.raises(UserError, match="no conversation ends with an assistant answer"):
        train_rl(sft, no_answers, tag="x", overrides=FAST_RL)
    with pytest.raises(UserError, match="model.d_model cannot be set"):
        train_rl(sft, _arithmetic(4, 0), tag="x", overrides=["model.d_model=32"])


def test_train_rl_under_torchrun_with_two_processes(sft_checkpoint, tmp_path) -> None:
    import json
    import os
    import subprocess
    import sys

    from nanoforge import home

    _, sft = sft_checkpoint
    data, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in _arithmetic(10, 0)))
    val.write_text("".join(json.dumps(c) + "\n" for c in _arithmetic(4, 1)))
    sets = sum((["--set", o] for o in FAST_RL + ["rl.prompts_per_step=1", "rl.max_steps=2"]), [])
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "nanoforge", "train", "rl", "--from", str(sft), "--data", str(data), "--val", str(val),
                        "--tag", "ddp", *sets], capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("checkpoint:") == 1  # rank 0 reports and writes
    folder = home.checkpoint_dir("rl", "ddp")
    meta = json.loads((folder / "meta_000002.json").read_text())
    assert meta["world_size"] == 2 and meta["phase"] == "rl"
    assert meta["loader"] == [{"epoch": 0, "pos": 2}, {"epoch": 0, "pos": 2}]  # each rank took its own 2 prompts
    rows = [json.loads(line) for line in (home.run_dir("rl-ddp") / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2] and all(x["sampled_tokens"] > 0 for x in rows)
    assert "pass@1" in rows[-1] and meta["val"]["pass@1"] == rows[-1]["pass@1"]
    assert len(meta["start_correct"]) == 4  # both ranks' held-out problems
    assert rows[-1]["pass@1_gain"] == pytest.approx(rows[-1]["pass@1"] - meta["start_val"]["pass@1"], abs=2e-6)


# --- the speedrun and ablation plumbing of the chat stages ------------------------------------------------------
def test_ablation_grid_takes_sft_and_rl_keys_as_axes(tmp_path, monkeypatch) -> None:
    import nanoforge.pipeline.ablate as ablate_mod
    from nanoforge.pipeline.ablate import ablate, comparison_table
    from nanoforge.pipeline.speedrun import phase_overrides

    grid = tmp_path / "grid.toml"
    grid.write_text('[base]\npreset = "ci"\nset = ["speedrun.until=\\"rl\\""]\n\n'
                    '[axes]\n"rl.group_size" = [2, 4]\n"sft.epochs" = [0.01]\n')
    calls = []

    def fake_speedrun(preset, **kw):
        calls.append(kw["overrides"])
        g = int(next(o for o in kw["overrides"] if o.startswith("rl.group_size")).split("=")[1])
        return {"report": str(grid), "rl_pass1_after": 0.1 * g, "rl_pass1_stderr_after": 0.05,
                "chat_eval": {"sft": {"arithmetic_chat exact_match": 0.1}, "rl": {"arithmetic_chat exact_match": 0.05 * g}}}

    monkeypatch.setattr(ablate_mod, "speedrun", fake_speedrun)
    result = ablate(grid, name="g")
    assert [c["values"] for c in result["cells"]] == [{"rl.group_size": 2, "sft.epochs": 0.01},
                                                     {"rl.group_size": 4, "sft.epochs": 0.01}]
    # each cell's RL/SFT settings reach train rl / train sft, after the preset's own
    rl_sets = phase_overrides("rl", "ci", None, calls[1])
    assert rl_sets[-1] == "rl.group_size=4" and "rl.max_steps=4" in rl_sets
    assert phase_overrides("sft", "ci", None, calls[0])[-1] == "sft.epochs=0.01"
    table = comparison_table(result["cells"], ["rl.group_size", "sft.epochs"])
    assert table["columns"] == ["group_size", "epochs", "chat arithmetic_chat exact_match", "RL pass@1"]
    assert "**0.4000**" in table["md"] and "0.2000 ~" not in table["md"]  # 0.2 is 0.2 away: outside one stderr


def test_report_html_opens_with_results_and_folds_the_configuration(tmp_path) -> None:
    from nanoforge.pipeline.report import markdown_to_html

    md = "\n".join(["# r", "## Headline", "| a | b |", "|---|---|", "| 1 | 2 |", "",
                    "<details><summary>Hardware, software and configuration</summary>", "", "## Configuration",
                    "```toml", "a = 1 <b>", "```", "</details>"])
    html = markdown_to_html(md, tmp_path)
    assert html.index("<h2>Headline</h2>") < html.index("<details><summary>") < html.index("<h2>Configuration")
    assert "a = 1 &lt;b&gt;" in html and html.count("</details>") == 1
    # only our own fixed lines pass through as HTML: anything else is escaped
    assert "&lt;details onclick" in markdown_to_html('<details onclick="x()">', tmp_path)


def test_rl_under_cpu_bf16_autocast_records_it_and_keeps_fp32_weights(sft_checkpoint, monkeypatch) -> None:
    """RL on the one loop where `auto` picks bf16 autocast on a CPU (forced here): the checkpoint says so, the
    weights stay fp32, and they move differently from an fp32 run's."""
    import json

    import nanoforge.train.rl as rl
    from nanoforge import home
    from nanoforge.checkpoint import checkpoint_steps

    _, sft = sft_checkpoint
    _vary_reward(monkeypatch)
    data, val = _arithmetic(12, 0), _arithmetic(4, 1)
    for choice in ("bf16", "fp32"):
        monkeypatch.setenv("NANOFORGE_CPU_BF16", choice)
        out = rl.train_rl(sft, data, val=val, tag=f"dtype-{choice}", overrides=FAST_RL)
        assert out["step"] == 4 and 0 <= out["pass@1"] <= 1
    folder = home.checkpoint_dir("rl", "dtype-bf16")
    meta = json.loads((folder / f"meta_{checkpoint_steps(folder)[-1]:06d}.json").read_text())
    assert meta["autocast"] == "bfloat16"
    bf16, fp32 = _weights("dtype-bf16"), _weights("dtype-fp32")
    assert all(t.dtype == torch.float32 for t in bf16.values())
    assert any(not torch.equal(bf16[k], fp32[k]) for k in bf16)
