"""What every writing command promises: one process per output (locks), names that stay inside the data
home, `--force` that replaces only at the end, SIGTERM handled like Ctrl-C, files readable by others."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _data_helpers import make_corpus, write_parquet

from nanoforge import home
from nanoforge.cli import main
from nanoforge.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _wait_for(cond, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small parquet corpus, a 300-id rustbpe tokenizer and its token shards (built once per module)."""
    from nanoforge.data.tokenize import tokenize_corpus
    from nanoforge.tokenizer.train import train_tokenizer

    root = tmp_path_factory.mktemp("safety_data")
    corpus = make_corpus(root / "corpus", n_docs=400, files=2)
    tok = train_tokenizer(corpus, vocab_size=300, backend="rustbpe", out=root / "tok")
    tokens = tokenize_corpus(corpus, tok, out=root / "tokens", val_docs=20, workers=1)
    return {"corpus": corpus, "tokenizer": tok, "tokens": tokens}


# --- names --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", ".hidden", "", "-rf", "x y", "/abs", "a\\b"])
def test_check_name_refuses_paths_and_odd_names(name: str) -> None:
    with pytest.raises(UserError, match="is not a valid name"):
        home.check_name(name, "tag")


def test_check_name_accepts_plain_names() -> None:
    for name in ("demo", "de32k", "run_1.2-b", "grid--lr=0.001", "a+b"):
        assert home.check_name(name) == name
    assert home.check_name(home.slug("Mein Korpus/2024 (neu)")) == "Mein-Korpus-2024-neu"


@pytest.mark.parametrize("argv", [
    ["train", "base", "--preset", "ci", "--tokens", "TOKENS", "--tag", "../../../escape_tag"],
    ["train", "base", "--preset", "ci", "--tokens", "TOKENS", "--tag", "ok", "--run", "../escape_run"],
    ["tokenizer", "train", "--data", "CORPUS", "--vocab-size", "300", "--name", "../../escape"],
    ["data", "tokenize", "--corpus", "CORPUS", "--tokenizer", "TOK", "--name", "../escape"],
])
def test_names_with_slashes_or_dots_are_refused_and_nothing_escapes(argv, data, nanoforge_home, capsys) -> None:
    subst = {"TOKENS": str(data["tokens"]), "CORPUS": str(data["corpus"]), "TOK": str(data["tokenizer"])}
    before = set(nanoforge_home.parent.iterdir())
    assert main([subst.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "is not a valid name" in err and err.count("\n") == 1
    assert set(nanoforge_home.parent.iterdir()) == before  # nothing written beside the home
    assert not list(nanoforge_home.rglob("*escape*"))


# --- locks --------------------------------------------------------------------------------------------
_HOLD = textwrap.dedent("""
    import sys, time
    from nanoforge import home
    with home.lock(sys.argv[1], "token folder"):
        print("locked", flush=True)
        time.sleep(600)
""")


def test_lock_names_its_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, caplog) -> None:
    out = tmp_path / "tokens" / "de"
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(UserError) as e:
            with home.lock(out, "token folder"):
                pass
        msg = str(e.value)
        assert f"token folder {out} is in use by pid {p.pid} on " in msg and " since " in msg
        # what a killed writer leaves: a temporary beside the output and one inside it
        out.mkdir()
        (tmp_path / "tokens" / ".de.12345.abcd1234.tmp").mkdir()
        (out / ".train_00003.bin.12345.tmp").write_bytes(b"half")
        (out / "train_00000.bin").write_bytes(b"kept")
    finally:
        p.kill()
        p.wait()
    with home.lock(out, "token folder"):
        assert (out / "train_00000.bin").read_bytes() == b"kept"
        assert not (tmp_path / "tokens" / ".de.12345.abcd1234.tmp").exists()
        assert not (out / ".train_00003.bin.12345.tmp").exists()
    assert f"took over the stale lock of token folder {out}: pid {p.pid}" in caplog.text
    assert not home.lock_path(out).exists()  # released


def test_lock_is_reentrant_in_one_process(tmp_path) -> None:
    with home.lock(tmp_path / "x"):
        with home.lock(tmp_path / "x"):
            assert home.lock_path(tmp_path / "x").exists()
        assert home.lock_path(tmp_path / "x").exists()
    assert not home.lock_path(tmp_path / "x").exists()


def test_two_trainings_on_one_tag_the_second_is_refused_the_first_intact(data, nanoforge_home, capsys) -> None:
    args = ["train", "base", "--preset", "ci", "--tokens", str(data["tokens"]), "--tag", "same",
            "--set", "train.max_steps=30", "--set", "train.eval_every=0"]
    first = subprocess.Popen([sys.executable, "-m", "nanoforge", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=_env())
    lock = home.lock_path(nanoforge_home / "checkpoints" / "base" / "same")
    _wait_for(lambda: lock.exists() and lock.stat().st_size > 0 or first.poll() is not None)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"checkpoint tag 'same' {nanoforge_home / 'checkpoints' / 'base' / 'same'} is in use by pid " \
           f"{first.pid}" in err
    out, ferr = first.communicate(timeout=300)
    assert first.returncode == 0, ferr
    meta = json.loads((nanoforge_home / "checkpoints" / "base" / "same" / "meta_000030.json").read_text())
    assert meta["step"] == 30 and meta["run"] == "base-same"
    steps = [json.loads(line)["step"] for line in
             (nanoforge_home / "runs" / "base-same" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 30  # one run's metrics, not two interleaved
    assert not lock.exists()


def test_a_run_folder_belongs_to_one_training(data, nanoforge_home, capsys) -> None:
    base = ["train", "base", "--preset", "ci", "--tokens", str(data["tokens"]), "--set", "train.max_steps=4",
            "--set", "train.eval_every=0"]
    assert main([*base, "--tag", "a", "--run", "shared"]) == 0
    metrics = (nanoforge_home / "runs" / "shared" / "metrics.jsonl").read_bytes()
    config = (nanoforge_home / "runs" / "shared" / "config.toml").read_bytes()
    capsys.readouterr()
    assert main([*base, "--tag", "b", "--run", "shared"]) == 2
    err = capsys.readouterr().err
    assert "belongs to the training of tag 'a'" in err and "--run" in err
    assert main([*base, "--tag", "b", "--run", "shared", "--resume"]) == 2  # b has no checkpoints either way
    assert (nanoforge_home / "runs" / "shared" / "metrics.jsonl").read_bytes() == metrics
    assert (nanoforge_home / "runs" / "shared" / "config.toml").read_bytes() == config
    # the owner continues its own run: metrics are appended, not replaced
    assert main([*base[:-4], "--set", "train.max_steps=6", "--set", "train.eval_every=0", "--tag", "a",
                 "--run", "shared", "--resume"]) == 0
    steps = [json.loads(x)["step"] for x in (nanoforge_home / "runs" / "shared" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_of_a_finished_training_says_it_is_complete(data, nanoforge_home, capsys) -> None:
    base = ["train", "base", "--preset", "ci", "--tokens", str(data["tokens"]), "--tag", "done",
            "--set", "train.max_steps=3", "--set", "train.eval_every=0"]
    assert main(base) == 0
    capsys.readouterr()
    assert main([*base, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint tag 'done' is already complete at step 3/3" in out


# --- --force, signals, temporaries ------------------------------------------------------------------------
def test_tokenize_force_interrupted_keeps_the_old_folder(data, tmp_path, monkeypatch) -> None:
    from nanoforge.data import shards, tokenize

    out = tmp_path / "tok-out"
    tokenize.tokenize_corpus(data["corpus"], data["tokenizer"], out=out, val_docs=20, workers=1, shard_tokens=2000)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []
    real = shards.write_shard

    def interrupt_after_two(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(shards, "write_shard", interrupt_after_two)
    with pytest.raises(KeyboardInterrupt):
        tokenize.tokenize_corpus(data["corpus"], data["tokenizer"], out=out, val_docs=30, workers=1,
                                 shard_tokens=2000, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok-out"]  # no temporary, no lock left
    monkeypatch.setattr(shards, "write_shard", real)
    tokenize.tokenize_corpus(data["corpus"], data["tokenizer"], out=out, val_docs=30, workers=1,
                             shard_tokens=2000, force=True)
    assert json.loads((out / "meta.json").read_text())["val_docs"] == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok-out"]


def test_sigterm_during_tokenizer_training_cleans_up(nanoforge_home, tmp_path) -> None:
    # Random words: enough distinct pairs that 32k merges take many seconds, so the signal lands mid-job.
    rng = random.Random(0)
    docs = [" ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyzäöü") for _ in range(rng.randint(3, 10)))
                     for _ in range(60)) for _ in range(6000)]
    corpus = tmp_path / "corpus"
    write_parquet(corpus / "shard_00000.parquet", docs, 256)
    p = subprocess.Popen([sys.executable, "-m", "nanoforge", "tokenizer", "train", "--data", str(corpus),
                          "--backend", "python", "--vocab-size", "32768", "--name", "slow"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    tokenizers = nanoforge_home / "tokenizers"
    _wait_for(lambda: (tokenizers.is_dir() and any(x.name.endswith(".tmp") for x in tokenizers.iterdir()))
              or p.poll() is not None)
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    assert list(tokenizers.iterdir()) == []  # no temporary folder, no lock file, no half tokenizer


def test_outputs_are_readable_by_others_under_umask_022(data, tmp_path) -> None:
    from nanoforge.data.tokenize import tokenize_corpus
    from nanoforge.tokenizer.train import train_tokenizer

    old = os.umask(0o022)
    try:
        tok = train_tokenizer(data["corpus"], vocab_size=300, backend="rustbpe", out=tmp_path / "tok")
        tokens = tokenize_corpus(data["corpus"], tok, out=tmp_path / "tokens", val_docs=20, workers=1)
        home.atomic_write_text(tmp_path / "note.txt", "x")
    finally:
        os.umask(old)
    paths = [tmp_path / "note.txt", tok, tokens, *tok.rglob("*"), *tokens.rglob("*")]
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in paths}
    assert all(m == (0o755 if Path(tmp_path / k).is_dir() else 0o644) for k, m in modes.items()), modes


# --- unwritable outputs are refused before the work ----------------------------------------------------
def test_an_output_under_a_file_is_refused_before_the_work(data, tmp_path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    for argv in (["tokenizer", "train", "--data", str(data["corpus"]), "--vocab-size", "300",
                  "--out", str(tmp_path / "file" / "tok")],
                 ["data", "tokenize", "--corpus", str(data["corpus"]), "--tokenizer", str(data["tokenizer"]),
                  "--out", str(tmp_path / "file" / "tokens")],
                 ["data", "import", str(data["corpus"]), "--out", str(tmp_path / "file" / "corpus")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "cannot write" in err and f"{tmp_path / 'file'} is not a folder" in err, err


def test_train_with_an_unwritable_home_stops_before_training(data, tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "checkpoints").write_text("not a folder")
    monkeypatch.setenv("NANOFORGE_HOME", str(tmp_path / "home"))
    assert main(["train", "base", "--preset", "ci", "--tokens", str(data["tokens"]), "--tag", "t"]) == 2
    err = capsys.readouterr().err
    assert "cannot write checkpoint tag 't'" in err and f"{tmp_path / 'home' / 'checkpoints'} is not a folder" in err
    assert not (tmp_path / "home" / "runs").exists()  # stopped before anything was written
