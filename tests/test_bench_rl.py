"""bench/rl.py's setup: nanoforge's RL and TRL's GRPOTrainer sample from the same prompt ids in the same
order and score completions with the same reward (a tiny run of both; nothing is timed)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from _bench_helpers import load_bench

pytest.importorskip("trl", reason="TRL comes with the bench extra (pip install -e '.[bench]')")



@pytest.mark.slow
def test_both_sides_sample_the_same_prompts_and_score_alike(tmp_path: Path) -> None:
    from nanoforge.train.rl import answer_reward

    rl = load_bench("rl")
    args = argparse.Namespace(prompts=2, group=2, new_tokens=3, micro_batch=2, steps=2, problems=12, vocab=300,
                              ctx=128, threads=None)
    env = rl.setup(tmp_path, args)
    ours = rl.run_ours(env, args, "t")
    theirs = rl.run_trl(env, args, tmp_path / "trl")
    # TRL rendered its prompts through the exported chat template; ours come from our renderer
    assert rl.same_prompts(env, [ours], args.group)
    assert rl.same_prompts(env, [theirs], args.group)
    assert len({tuple(env["problems"][i].prompt_ids) for step in env["steps"] for i in step}) == 4  # not vacuous
    for log in (ours, theirs):
        assert [r["n"] for r in log["rollouts"]] == [4, 4]
        assert len(log["steps"]) == 2
    # TRL hands its reward function conversational completions; the bench scores their text by our rule
    texts = ["3 + 4 = 7\n#### 7", "#### 8", "no answer at all", "#### 1,000"]
    answers = ["7", "7", "7", "1000"]
    got = rl.trl_reward([None] * 4, [[{"role": "assistant", "content": t}] for t in texts], answers)
    assert got == [answer_reward(t, a) for t, a in zip(texts, answers)] == [1.0, 0.0, 0.0, 1.0]
