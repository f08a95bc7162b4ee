"""Supervised fine-tuning on the one training loop: best-fit packing that never splits a conversation,
the step's loss normalised over all learned tokens (accumulation 4 = one 4x batch), steps without a
learned token skipped, held-out loss, exact resume after SIGINT, and bad input ending in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _sft_helpers import make_base
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from nanoforge.cli import main
from nanoforge.data.chat_loader import ChatLoader, pack_rows
from nanoforge.errors import UserError
from nanoforge.train.loop import accumulate_gradients
from nanoforge.train.sft import train_sft

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    home = tmp_path_factory.mktemp("sft_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOFORGE_HOME", str(home))
        d = make_base(tmp_path_factory.mktemp("sft_data"))
    return d


def _losses(home: Path, run: str) -> list[float | None]:
    return [json.loads(line)["loss"] for line in (home / "runs" / run / "metrics.jsonl").read_text().splitlines()]


# --- packing -------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 17), min_size=1, max_size=60), st.integers(1, 8))
def test_best_fit_packing_keeps_every_conversation_whole(lengths, buffer_size) -> None:
    rows = pack_rows(lengths, 17, buffer_size)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))  # each conversation exactly once, none split
    assert all(sum(lengths[i] for i in row) <= 17 for row in rows)


def test_loader_rows_hold_whole_conversations_with_their_masks() -> None:
    rendered = [([100 + i] * n, [0] + [1] * (n - 1)) for i, n in enumerate([5, 9, 3, 7, 2, 9, 4])]
    loader = ChatLoader(rendered, batch_size=2, seq_len=9, pad_id=0, seed=3, infinite=False, buffer_size=4)
    seen = []
    for x, y, mask in loader:
        for b in range(x.shape[0]):
            row = torch.cat([x[b], y[b, -1:].clamp(min=0)]).tolist()
            i = 0
            while i < len(row) and row[i] >= 100:
                cid = row[i]
                n = len(rendered[cid - 100][0])
                assert row[i:i + n] == [cid] * n  # contiguous and complete
                # learned targets: every position of the conversation but its first token
                assert mask[b, i:i + n - 1].tolist() == [True] * (n - 1) if i + n - 1 <= 9 else True
                seen.append(cid)
                i += n
            assert all(t == 0 for t in row[i:])  # the rest is padding, never learned
            assert not mask[b, i:].any()
    assert sorted(seen) == list(range(100, 107))
    assert (y == -1).eq(~mask).all()


def test_conversation_longer_than_a_row_is_refused_by_the_loader() -> None:
    with pytest.raises(UserError, match="more than a row"):
        ChatLoader([([1] * 12, [1] * 12)], batch_size=1, seq_len=10, pad_id=0)


# --- the loss of a step --------------------------------------------------------------------------------

def _tiny_model():
    from nanoforge.model import LLaMA, ModelConfig

    torch.manual_seed(0)
    return LLaMA(ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64,
                             vocab_size=97, max_seq_len=32)).double()


def _grads(model) -> torch.Tensor:
    out = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return out


def test_accumulation_of_4_micro_batches_equals_one_4x_batch() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 97, (8, 16), generator=g)
    y = torch.randint(0, 97, (8, 16), generator=g)
    mask = torch.zeros(8, 16, dtype=torch.bool)
    for b, n in enumerate([1, 16, 3, 9, 0, 12, 2, 7]):  # very unequal learned counts per row
        mask[b, 16 - n:] = True
    y = y.masked_fill(~mask, -1)
    model = _tiny_model().float()
    loss_one, total = accumulate_gradients(model, [(x, y, mask)])
    g_one = _grads(model)
    micro = [(x[i:i + 2], y[i:i + 2], mask[i:i + 2]) for i in range(0, 8, 2)]
    loss_acc, total_acc = accumulate_gradients(model, micro)
    g_acc = _grads(model)
    assert total == total_acc == int(mask.sum())
    assert abs(loss_one.item() - loss_acc.item()) < 1e-6
    assert (g_one - g_acc).abs().max().item() < 1e-6
    # the naive mean of per-micro-batch means is measurably different: the test could fail
    naive = sum(model(a, b, m) for a, b, m in micro) / 4
    naive.backward()
    assert (g_one - _grads(model)).abs().max().item() > 1e-4


def test_a_step_without_learned_tokens_runs_nothing_and_gives_no_nan() -> None:
    model = _tiny_model().float()
    x = torch.randint(0, 97, (2, 8))
    loss, total = accumulate_gradients(model, [(x, torch.full((2, 8), -1), torch.zeros(2, 8, dtype=torch.bool))])
    assert total == 0 and loss.item() == 0.0
    assert all(p.grad is None for p in model.parameters())
    # a micro-batch without learned tokens next to one with them: finite, and only the other one counts
    y = torch.randint(0, 97, (2, 8))
    both = [(x, torch.full((2, 8), -1), torch.zeros(2, 8, dtype=torch.bool)), (x, y, torch.ones(2, 8, dtype=torch.bool))]
    loss, total = accumulate_gradients(model, both)
    assert total == 16 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(model(x, y).item(), abs=1e-6)


# --- training ------------------------------------------------------------------------------------------

def test_sft_lowers_the_held_out_loss_and_writes_sft_checkpoints(chat, nanoforge_home) -> None:
    s = train_sft(chat["base"], chat["train"], val=chat["val"], tag="learn", overrides=["train.sample_every=1000"])
    assert s["val_loss"] < s["base_val_loss"] - 0.5 and s["val_bpb"] < s["base_val_bpb"]
    assert s["conversations"] == 240 and s["val_conversations"] == 24 and s["skipped_steps"] == 0
    meta = json.loads(Path(s["checkpoint"]).with_name(f"meta_{s['step']:06d}.json").read_text())
    assert meta["phase"] == "sft" and meta["from"]["phase"] == "base"
    assert Path(s["checkpoint"]).parent == nanoforge_home / "checkpoints" / "sft" / "learn"
    cfg = meta["config"]
    assert cfg["train"]["schedule"] == "linear" and cfg["sft"]["learn"] == "assistant"
    assert cfg["train"]["lr"] == pytest.approx(1e-2 * 1.0)  # the ci base lr × sft.lr_scale
    assert cfg["sft"]["lr_scale"] == 1.0
    sample = json.loads((nanoforge_home / "runs" / "sft-learn" / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"].endswith("<|assistant_start|>") and isinstance(sample["completion"], str)


def test_mid_learns_every_token_of_the_same_rows(chat, nanoforge_home) -> None:
    args = dict(val=chat["val"], overrides=["train.max_steps=1", "train.eval_every=0"])
    train_sft(chat["base"], chat["train"], tag="m", phase="mid", **args)
    train_sft(chat["base"], chat["train"], tag="s", phase="sft", **args)
    learned = {p: json.loads((nanoforge_home / "runs" / f"{p}-{t}" / "metrics.jsonl").read_text())["learned_tokens"]
               for p, t in (("mid", "m"), ("sft", "s"))}
    assert learned["mid"] > 2 * learned["sft"] > 0
    meta = json.loads(next((nanoforge_home / "checkpoints" / "mid" / "m").glob("meta_*.json")).read_text())
    assert meta["phase"] == "mid" and meta["config"]["sft"]["learn"] == "all"


def test_device_batch_2_with_accumulation_4_trains_like_device_batch_8(chat, nanoforge_home) -> None:
    common = ["train.max_steps=4", "train.eval_every=0", "train.total_batch_tokens=512"]
    train_sft(chat["base"], chat["train"], val=chat["val"], tag="b8", overrides=[*common, "train.device_batch_size=8"])
    train_sft(chat["base"], chat["train"], val=chat["val"], tag="b2", overrides=[*common, "train.device_batch_size=2"])
    for a, b in zip(_losses(nanoforge_home, "sft-b8"), _losses(nanoforge_home, "sft-b2"), strict=True):
        assert abs(a - b) < 1e-5


def test_a_batch_of_nothing_but_masked_rows_is_skipped_and_counted(chat, nanoforge_home, monkeypatch) -> None:
    real = ChatLoader._batch
    calls = {"n": 0}

    def batch(self):
        x, y, mask = real(self)
        calls["n"] += self.infinite  # training batches only (validation makes its own loader)
        if self.infinite and calls["n"] == 2:  # the second step's batch learns nothing
            return x, torch.full_like(y, -1), torch.zeros_like(mask)
        return x, y, mask

    monkeypatch.setattr(ChatLoader, "_batch", batch)
    s = train_sft(chat["base"], chat["train"], val=chat["val"], tag="skip",
                  overrides=["train.max_steps=4", "train.eval_every=0"])
    losses = _losses(nanoforge_home, "sft-skip")
    assert s["skipped_steps"] == 1 and losses[1] is None
    assert all(isinstance(v, float) and v == v for i, v in enumerate(losses) if i != 1)


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nanoforge", "train", "sft", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_sigint_mid_sft_and_resume_is_bit_identical(chat, nanoforge_home) -> None:
    args = ["--from", str(chat["base"]), "--data", str(chat["train"]), "--val", str(chat["val"]),
            "--set", "train.max_steps=36", "--set", "train.eval_every=12", "--set", "train.save_every=10"]
    assert main(["train", "sft", *args, "--tag", "full"]) == 0
    metrics = nanoforge_home / "runs" / "sft-cut" / "metrics.jsonl"
    p = _cli(*args, "--tag", "cut")
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "continue with --resume" in err and "Traceback" not in err
    cut = len(metrics.read_text().splitlines())
    assert 5 <= cut < 36
    r = _cli(*args, "--tag", "cut", "--resume")
    out, err = r.communicate(timeout=300)
    assert r.returncode == 0, err
    assert _losses(nanoforge_home, "sft-cut") == _losses(nanoforge_home, "sft-full")
    folder = nanoforge_home / "checkpoints" / "sft"
    a, b = (load_file(str(folder / t / "model_000036.safetensors")) for t in ("full", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((folder / "cut" / "meta_000036.json").read_text())
    assert meta["base_val"]["val_loss"] > meta["val"]["val_loss"]  # kept across the resume


# --- bad input: one line, exit 2 ---------------------------------------------------------------------

def test_every_conversation_too_long_is_one_line_exit_2(chat, tmp_path, capsys) -> None:
    long = tmp_path / "long.jsonl"
    msg = {"messages": [{"role": "user", "content": "apples and books " * 40}, {"role": "assistant", "content": "ok"}]}
    long.write_text((json.dumps(msg) + "\n") * 5, encoding="utf-8")
    assert main(["train", "sft", "--from", str(chat["base"]), "--data", str(long), "--tag", "long"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "longer than a row of train.seq_len + 1 = 65 tokens" in err
    assert not (Path(os.environ["NANOFORGE_HOME"]) / "checkpoints" / "sft" / "long").exists()


def test_from_must_be_a_base_checkpoint_with_its_own_tokenizer(chat, tmp_path, capsys) -> None:
    s = train_sft(chat["base"], chat["train"], val=chat["val"], tag="once", overrides=["train.max_steps=1"])
    capsys.readouterr()
    assert main(["train", "mid", "--from", s["checkpoint_dir"], "--data", str(chat["train"]), "--tag", "m"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a checkpoint of phase sft; train mid starts from a base checkpoint" in err
    assert main(["train", "sft", "--from", str(tmp_path / "nothing"), "--data", str(chat["train"])]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "sft", "--from", str(chat["base"]), "--data", str(chat["train"]), "--tag", "x",
                 "--set", "model.d_model=128"]) == 2
    assert "model.d_model cannot be set" in capsys.readouterr().err
    # the checkpoint's tokenizer replaced by another one: refused, not silently used
    from nanoforge.tokenizer.train import train_tokenizer

    other = tmp_path / "other"
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("ganz andere Wörter " * 300, encoding="utf-8")
    train_tokenizer(tmp_path / "txt", vocab_size=300, backend="rustbpe", out=other)
    capsys.readouterr()
    meta_path = sorted(chat["base"].glob("meta_*.json"))[-1]
    saved = meta_path.read_text()
    meta = json.loads(saved)
    meta["tokenizer"]["path"] = str(other)
    meta_path.write_text(json.dumps(meta))
    try:
        assert main(["train", "sft", "--from", str(chat["base"]), "--data", str(chat["train"]), "--tag", "y"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is not the one checkpoint" in err
    finally:
        meta_path.write_text(saved)


# --- DDP ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_gloo_processes_normalise_over_both_ranks_tokens(chat, nanoforge_home) -> None:
    """torchrun with 2 processes equals one process that takes both ranks' batches as one step's
    micro-batches: the loss is the mean over the learned tokens of both ranks, not a mean of their means."""
    from nanoforge import checkpoint as ckpt
    from nanoforge.train.optim import build_optimizer, lr_multiplier, set_lr
    from nanoforge.train.sft import ChatData, checkpoint_tokenizer, phase_config

    overrides = ["train.max_steps=3", "train.eval_every=0", "train.total_batch_tokens=1024"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanoforge",
           "train", "sft", "--from", str(chat["base"]), "--data", str(chat["train"]), "--val", str(chat["val"]),
           "--tag", "ddp", *sum((["--set", o] for o in overrides), [])]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("checkpoint:") == 1
    folder, step, meta = ckpt.load_meta(chat["base"])
    cfg = phase_config(meta, "sft", overrides=overrides)
    tok = checkpoint_tokenizer(meta, str(folder))
    data = ChatData(tok, chat["train"], val=chat["val"], base=(folder, step, meta), sft=cfg.sft,
                    seq_len=cfg.train.seq_len, seed=cfg.train.seed)
    model, _ = ckpt.load_model(folder)
    model.train()
    opt = build_optimizer(model, cfg.train)
    ranks = [iter(ChatLoader(data.train_rows, batch_size=8, seq_len=64, pad_id=tok.bos_id, rank=k, world_size=2,
                             seed=cfg.train.seed, buffer_size=cfg.sft.buffer_size)) for k in range(2)]
    losses = []
    tc = cfg.train
    for s in range(3):
        set_lr(opt, lr_multiplier(s, 3, schedule=tc.schedule, warmup_steps=tc.warmup_steps, min_lr_frac=tc.min_lr_frac))
        loss, _ = accumulate_gradients(model, [next(ranks[0]), next(ranks[1])])
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    got = _losses(nanoforge_home, "sft-ddp")
    assert all(abs(a - b) < 1e-5 for a, b in zip(got, losses, strict=True))
    ddp = load_file(str(nanoforge_home / "checkpoints" / "sft" / "ddp" / "model_000003.safetensors"))
    assert all(torch.allclose(ddp[k], v, atol=1e-5) for k, v in model.state_dict().items() if k in ddp)


def test_phase_sections_set_their_runs_cadence_and_the_norm_gains_lr(chat) -> None:
    """[sft] eval_every, [rl] eval_every and norm_lr reach train.* (a preset's phase section holds them),
    and the optimizer gives the RMSNorm gains their own learning rate."""
    from nanoforge.checkpoint import checkpoint_steps
    from nanoforge.model import LLaMA
    from nanoforge.train.optim import build_optimizer
    from nanoforge.train.sft import phase_config

    base = chat["base"]
    meta = json.loads((base / f"meta_{checkpoint_steps(base)[-1]:06d}.json").read_text())
    assert phase_config(meta, "sft").train.eval_every == 25  # presets/phases/sft.toml
    assert phase_config(meta, "sft", overrides=["sft.eval_every=7"]).train.eval_every == 7
    plain = phase_config(meta, "rl")
    assert plain.train.eval_every == 10 and plain.train.norm_lr == 0.0
    cfg = phase_config(meta, "rl", overrides=["rl.eval_every=3", "rl.norm_lr=0.05", "rl.lr_scale=0.5"])
    assert cfg.train.eval_every == 3 and cfg.train.norm_lr == 0.05
    assert cfg.train.lr == pytest.approx(meta["config"]["train"]["lr"] * 0.5)
    model = LLaMA(cfg.model)
    opt = build_optimizer(model, cfg.train)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert lr_of[id(params["norm.weight"])] == lr_of[id(params["layers.0.ffn_norm.weight"])] == 0.05
    assert lr_of[id(params["layers.0.attention.wq.weight"])] == pytest.approx(cfg.train.lr)
    # rl.trainable reaches train.trainable; a later phase from that checkpoint trains everything again
    assert phase_config(meta, "rl", overrides=["rl.trainable=norm.weight"]).train.trainable == ["norm.weight"]
    frozen = {**meta, "config": {**meta["config"], "train": {**meta["config"]["train"], "trainable": ["norm.weight"]}}}
    assert phase_config(frozen, "sft").train.trainable == []


def test_sft_optimizer_replaces_the_checkpoints_for_the_phase(chat) -> None:
    """[sft] optimizer: a Muon-pretrained base fine-tunes with AdamW at the base run's AdamW rate (as the
    cpu-demo does); unset, the checkpoint's optimizer carries over; an unknown one is refused by name."""
    from nanoforge.checkpoint import checkpoint_steps
    from nanoforge.model import LLaMA
    from nanoforge.train.optim import MuonAdamW, build_optimizer
    from nanoforge.train.sft import phase_config

    base = chat["base"]
    meta = json.loads((base / f"meta_{checkpoint_steps(base)[-1]:06d}.json").read_text())
    muon = {**meta, "config": {**meta["config"], "train": {**meta["config"]["train"], "optimizer": "muon"}}}
    assert phase_config(muon, "sft").train.optimizer == "muon"
    cfg = phase_config(muon, "sft", overrides=["sft.optimizer=adamw"])
    assert cfg.train.optimizer == "adamw" and cfg.train.lr == meta["config"]["train"]["lr"]
    assert not isinstance(build_optimizer(LLaMA(cfg.model), cfg.train), MuonAdamW)
    assert isinstance(build_optimizer(LLaMA(cfg.model), phase_config(muon, "sft").train), MuonAdamW)
    with pytest.raises(UserError, match=r'sft.optimizer must be one of "", adamw, muon, got \'sgd\''):
        phase_config(meta, "sft", overrides=["sft.optimizer=sgd"])


def test_sft_under_cpu_bf16_autocast_records_it_and_learns_like_fp32(chat, monkeypatch) -> None:
    """Where `train.dtype = auto` picks bf16 autocast on a CPU (the measurement forced here), SFT says so in
    its checkpoint, keeps fp32 weights and reaches the fp32 run's held-out loss within a few percent."""
    runs = {}
    for choice in ("bf16", "fp32"):
        monkeypatch.setenv("NANOFORGE_CPU_BF16", choice)
        runs[choice] = train_sft(chat["base"], chat["train"], val=chat["val"], tag=f"dtype-{choice}",
                                 overrides=["train.sample_every=1000"])
    bf16, fp32 = runs["bf16"], runs["fp32"]
    folder = Path(bf16["checkpoint"])
    meta = json.loads(folder.with_name(f"meta_{bf16['step']:06d}.json").read_text())
    assert meta["autocast"] == "bfloat16"
    assert all(t.dtype == torch.float32 for t in load_file(str(folder)).values())
    assert bf16["val_loss"] < bf16["base_val_loss"] - 0.5
    assert bf16["val_loss"] == pytest.approx(fp32["val_loss"], rel=0.05) and bf16["val_loss"] != fp32["val_loss"]
