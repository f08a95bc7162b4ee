"""bench/sft.py's setup: nanoforge's SFT and TRL's SFTTrainer train on the same rows with the same first-step
loss, in both of TRL's packing modes, and TRL runs without activation checkpointing unless asked (a tiny
run of both; nothing is timed)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from _bench_helpers import load_bench

pytest.importorskip("trl", reason="TRL comes with the bench extra (pip install -e '.[bench]')")



@pytest.mark.slow
def test_both_sides_learn_the_same_tokens_without_trl_checkpointing(nanoforge_home: Path, tmp_path: Path) -> None:
    from nanoforge.export.hf import export_hf

    sft = load_bench("sft")
    steps, batch, seq_len = 2, 2, 64
    env = sft.setup(nanoforge_home, batch, seq_len, None, vocab_size=512)
    env["export"] = export_hf(env["base"], tmp_path / "hf")
    rows = sft.trl_rows(env, steps, batch, seq_len)
    assert [len(r) for r in rows[0]] == [seq_len + 1] * steps * batch
    first_learned = sum(sum(m) for m in rows[1][:batch])
    assert first_learned > 0
    ours = sft.run_ours(env, steps, "t")
    assert len(ours["ends"]) == steps
    args = argparse.Namespace(steps=steps, batch=batch, seq_len=seq_len, trl_metrics=False, trl_checkpointing=False)
    shapes = {"wrapped": (batch, seq_len + 1), "bfd": (1, batch * (seq_len + 1))}
    for mode, shape in shapes.items():
        theirs = sft.run_trl(env, rows, args, tmp_path / mode, mode)
        assert theirs["shape"] == shape
        assert theirs["learned"] == first_learned  # TRL's labels are our mask, shifted as ours
        assert abs(theirs["first_loss"] - ours["first_loss"]) < 1e-4
        assert theirs["checkpointing"] is False
        assert len(theirs["ends"]) == steps
    # the check can fail: with TRL's default (checkpointing on) it reports so, and the loss is unchanged
    args.trl_checkpointing, args.trl_metrics = True, True
    theirs = sft.run_trl(env, rows, args, tmp_path / "default", "wrapped")
    assert theirs["checkpointing"] is True
    assert abs(theirs["first_loss"] - ours["first_loss"]) < 1e-4
