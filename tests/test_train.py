"""The training loop on real German text: learning, bits per byte, exact resume after SIGINT,
DDP and FSDP2 under torchrun (gloo), and bad input ending in one line with exit code 2."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from nanoforge.cli import main
from nanoforge.config import load_config
from nanoforge.errors import UserError
from nanoforge.train.loop import train

CORPUS_DE = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "de"
FAST = ["train.max_steps=12", "train.eval_every=6", "train.eval_batches=2"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 512-token rustbpe tokenizer and token shards of ~400 German documents (built once per module);
    a second tokenizer (other vocab) with its own shards for the mismatch tests."""
    if not CORPUS_DE.is_dir():
        pytest.skip(f"needs the shared corpus at {CORPUS_DE}")
    from nanoforge.data.tokenize import tokenize_corpus
    from nanoforge.tokenizer.train import train_tokenizer

    root = tmp_path_factory.mktemp("train_data")
    table = pq.read_table(sorted(CORPUS_DE.glob("*.parquet"))[0], columns=["text"]).slice(0, 400)
    (root / "corpus").mkdir()
    pq.write_table(table, root / "corpus" / "shard_00000.parquet")
    out = {}
    for name, vocab in (("de512", 512), ("de600", 600)):
        tok = train_tokenizer(root / "corpus", vocab_size=vocab, backend="rustbpe", out=root / "tok" / name,
                              max_chars=300_000)
        out[name] = tokenize_corpus(root / "corpus", tok, out=root / "tokens" / name, val_docs=20, workers=1)
    return out


def _cli(*args: str, launcher: list[str] | None = None, **kw) -> subprocess.Popen:
    cmd = (launcher or [sys.executable]) + ["-m", "nanoforge", "train", "base", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def _run(*args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    p = _cli(*args, launcher=launcher)
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _losses(home: Path, run: str) -> list[float]:
    return [json.loads(line)["loss"] for line in (home / "runs" / run / "metrics.jsonl").read_text().splitlines()]


def _weights(home: Path, tag: str, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(home / "checkpoints" / "base" / tag / f"model_{step:06d}.safetensors"))


def test_loss_decreases_on_german_text_and_writes_run_outputs(data, nanoforge_home) -> None:
    cfg = load_config(preset="ci", overrides=["train.max_steps=30", "train.sample_every=30"])
    summary = train(cfg, tokens=str(data["de512"]), tag="learn")
    losses = _losses(nanoforge_home, "base-learn")
    assert len(losses) == 30 and summary["step"] == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.7
    assert 0.5 < summary["val_bpb"] < 8 / math.log(2)  # better than uniform over 512 ids, and sane
    run = nanoforge_home / "runs" / "base-learn"
    assert load_config(path=run / "config.toml").train.max_steps == 30
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "lr", "tokens_per_second", "mfu", "val_bpb"} <= set(record)
    sample = json.loads((run / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"] == "Die Stadt" and isinstance(sample["completion"], str)
    meta = json.loads(Path(summary["checkpoint"]).with_name("meta_000030.json").read_text())
    assert meta["tokenizer"]["fingerprint"] and meta["model_config"]["vocab_size"] == 512


def test_log_every_thins_metrics_but_keeps_the_last_step(data, nanoforge_home) -> None:
    cfg = load_config(preset="ci", overrides=["train.max_steps=6", "train.log_every=4", "train.eval_every=0"])
    train(cfg, tokens=str(data["de512"]), tag="sparse")
    lines = (nanoforge_home / "runs" / "base-sparse" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [4, 6]


def test_muon_trains(data) -> None:
    cfg = load_config(preset="ci", overrides=["train.optimizer=muon", "train.max_steps=25", "train.eval_every=0"])
    summary = train(cfg, tokens=str(data["de512"]), tag="muon")
    assert summary["loss"] < 5.5  # ln(512) = 6.24 at the start; ~4.9 after 25 steps


def test_evaluate_bpb_of_a_uniform_model_is_log2_vocab_per_byte(data) -> None:
    from nanoforge.eval.bpb import evaluate_bpb
    from nanoforge.model import LLaMA, ModelConfig
    from nanoforge.tokenizer import Tokenizer

    tok = Tokenizer.load(json.loads((data["de512"] / "meta.json").read_text())["tokenizer"]["path"])
    model = LLaMA(ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16, ffn_dim=64,
                              vocab_size=512, max_seq_len=64))
    torch.nn.init.zeros_(model.output.weight)  # logits all 0: ln(512) nats per token
    r = evaluate_bpb(model, data["de512"], tok.token_bytes, batch_size=4, seq_len=64, device="cpu")
    assert r["val_bpb"] == pytest.approx(r["tokens"] * math.log2(512) / r["bytes"], rel=1e-6)
    assert r["bytes"] > r["tokens"] > 0


def test_sigint_mid_run_checkpoints_and_resume_is_bit_identical(data, nanoforge_home) -> None:
    args = ["--preset", "ci", "--tokens", str(data["de512"]), "--set", "train.max_steps=40",
            "--set", "train.eval_every=20", "--set", "train.save_every=15"]
    assert main(["train", "base", *args, "--tag", "full"]) == 0  # in-process: one thread, like the subprocesses
    metrics = nanoforge_home / "runs" / "base-cut" / "metrics.jsonl"
    p = _cli(*args, "--tag", "cut")
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 10):
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "continue with --resume" in err and "Traceback" not in err
    cut_step = len(metrics.read_text().splitlines())
    assert 10 <= cut_step < 40
    assert (nanoforge_home / "checkpoints" / "base" / "cut" / f"model_{cut_step:06d}.safetensors").exists()
    resumed = _run(*args, "--tag", "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(nanoforge_home, "base-cut") == _losses(nanoforge_home, "base-full")
    a, b = _weights(nanoforge_home, "full", 40), _weights(nanoforge_home, "cut", 40)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process_with_double_accumulation(data, nanoforge_home, parallel) -> None:
    common = ["--preset", "ci", "--tokens", str(data["de512"]), "--set", "train.total_batch_tokens=1024", *sum(
        (["--set", o] for o in FAST), [])]
    if not (nanoforge_home / "checkpoints" / "base" / "one").exists():
        assert main(["train", "base", *common, "--tag", "one"]) == 0  # 1 process: 2 micro-batches per step
    two = _run(*common, "--tag", parallel, "--set", f"train.parallel={parallel}", launcher=_torchrun())
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("checkpoint:") == 1  # rank 0 reports and writes
    for x, y in zip(_losses(nanoforge_home, "base-one"), _losses(nanoforge_home, f"base-{parallel}"), strict=True):
        assert abs(x - y) < 1e-5
    a, b = _weights(nanoforge_home, "one", 12), _weights(nanoforge_home, parallel, 12)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    meta = json.loads((nanoforge_home / "checkpoints" / "base" / parallel / "meta_000012.json").read_text())
    assert meta["world_size"] == 2 and len(meta["loader"]) == 2


# --- bad input: one line, exit 2, nothing lost ------------------------------------------------------------

def test_unknown_preset_and_key_are_one_line_errors(data, capsys) -> None:
    assert main(["train", "base", "--preset", "nope", "--tokens", str(data["de512"])]) == 2
    assert "available presets: ci, cpu-demo" in capsys.readouterr().err
    assert main(["train", "base", "--preset", "ci", "--tokens", str(data["de512"]), "--set", "train.lrate=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "valid keys: train.max_steps" in err


def test_batch_that_does_not_divide_is_refused(data, capsys) -> None:
    assert main(["train", "base", "--preset", "ci", "--tokens", str(data["de512"]),
                 "--set", "train.total_batch_tokens=1000"]) == 2
    assert "not a multiple of device_batch_size × seq_len × processes = 8 × 64 × 1 = 512" in capsys.readouterr().err


def test_resume_refuses_other_tokenizer_changed_shape_and_torn_checkpoint(data, nanoforge_home, capsys) -> None:
    base = ["train", "base", "--preset", "ci", "--tag", "t", *sum((["--set", o] for o in FAST), [])]
    assert main([*base, "--tokens", str(data["de512"])]) == 0
    capsys.readouterr()
    assert main([*base, "--tokens", str(data["de512"])]) == 2  # the tag exists: never overwrite silently
    assert "already exist" in capsys.readouterr().err
    assert main([*base, "--tokens", str(data["de600"]), "--resume"]) == 2
    assert "different tokenizer" in capsys.readouterr().err
    assert main([*base, "--tokens", str(data["de512"]), "--resume", "--set", "model.d_model=96"]) == 2
    assert "changed model shape (model.d_model 64 -> 96" in capsys.readouterr().err
    folder = nanoforge_home / "checkpoints" / "base" / "t"
    model = folder / "model_000012.safetensors"
    backup = model.read_bytes()
    model.write_bytes(backup[: len(backup) // 2])
    assert main([*base, "--tokens", str(data["de512"]), "--resume", "--set", "train.max_steps=14"]) == 2
    assert "is torn: model file model_000012.safetensors" in capsys.readouterr().err
    model.write_bytes(backup)  # nothing else was touched: the checkpoint is whole again
    assert main([*base, "--tokens", str(data["de512"]), "--resume", "--set", "train.max_steps=14"]) == 0
    assert sorted(p.name for p in folder.glob("model_*")) == ["model_000012.safetensors", "model_000014.safetensors"]


def test_missing_token_shards_is_a_user_error(tmp_path) -> None:
    with pytest.raises(UserError, match="not found"):
        train(load_config(preset="ci"), tokens=str(tmp_path / "nothing"), tag="x")


def test_cli_exit_code_2_in_a_subprocess(data) -> None:
    r = _run("--preset", "ci", "--tokens", str(data["de512"]), "--set", "train.optimizer=sgd")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: train.optimizer must be one of adamw, muon, got 'sgd'"]


def test_tokens_by_name_under_home(data, nanoforge_home) -> None:
    shutil.copytree(data["de512"], nanoforge_home / "tokens" / "named")
    summary = train(load_config(preset="ci", overrides=["train.max_steps=2", "train.eval_every=0"]),
                    tokens="named", tag="named")
    assert summary["step"] == 2 and summary["val_bpb"] is not None
