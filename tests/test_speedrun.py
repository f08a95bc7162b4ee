"""End-to-end speedruns and ablation grids on the `ci` preset (tiny model, a few dozen steps) on real text."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanoforge import home
from nanoforge.cli import main
from nanoforge.data.corpus import iter_documents

FAST = ["--set", "eval.limit=8"]  # keep the task evaluation to a handful of examples


def _numbers(obj: object) -> list[float]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers(v)]
    return [float(obj)] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


def _stages(run: str) -> dict:
    return json.loads((home.run_dir(run) / "stages.json").read_text())["stages"]


@pytest.fixture
def corpus_slice(corpus_de: Path, tmp_path: Path) -> Path:
    """The first 300 documents of ../shared/corpus/de as one parquet shard (a quicker corpus)."""
    docs = []
    for text in iter_documents(corpus_de):
        docs.append(text)
        if len(docs) == 300:
            break
    out = tmp_path / "de-slice"
    out.mkdir()
    pq.write_table(pa.table({"text": docs}), out / "shard_00000.parquet")
    return out


def test_ci_speedrun_on_german_corpus_writes_every_artifact(corpus_de: Path) -> None:
    assert main(["speedrun", "--preset", "ci", "--data", str(corpus_de), "--run", "ci-de", *FAST]) == 0
    run_dir = home.run_dir("ci-de")
    stages = _stages("ci-de")
    assert list(stages) == ["data", "tokenizer", "tokenizer_eval", "tokenize", "pretrain", "eval", "export", "report"]

    tok = Path(stages["tokenizer"]["result"]["path"])
    assert (tok / "hf" / "tokenizer.json").is_file()
    tokens = Path(stages["tokenize"]["result"]["tokens"])
    assert (tokens / "meta.json").is_file() and list(tokens.glob("train_*.bin")) and list(tokens.glob("val_*.bin"))
    ckpt = Path(stages["pretrain"]["result"]["checkpoint_dir"])
    assert list(ckpt.glob("model_*.safetensors")) and list(ckpt.glob("meta_*.json"))
    assert list((run_dir / "tokenizer_eval").iterdir())
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert math.isfinite(results["val_bpb"]) and 0 < results["val_bpb"] < 20
    assert results["samples"] and results["samples"][0]["prompt"] == "Die Stadt"

    report = (run_dir / "report.md").read_text()
    pngs = [line.split("(")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert len(pngs) == 2 and all((run_dir / p).stat().st_size > 1000 for p in pngs)
    for section in ("Hardware and software", "Configuration", "Tokenizer", "FLOPs", "MFU", "Evaluation",
                    "Samples", "Time per stage", "Disk used", "nanoforge sample"):
        assert section in report
    html = (run_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["params"] > 0
    assert all(math.isfinite(x) for x in _numbers(summary))
    assert "[5/8] pretrain" in (run_dir / "log.txt").read_text()

    # the same command again: every stage is up to date (the report is always rewritten)
    assert main(["speedrun", "--preset", "ci", "--data", str(corpus_de), "--run", "ci-de", *FAST]) == 0
    again = _stages("ci-de")
    assert [n for n, s in again.items() if not s["skipped"]] == ["report"]

    import torch
    from transformers import AutoModelForCausalLM

    export = Path(stages["export"]["result"]["export"])
    model = AutoModelForCausalLM.from_pretrained(export)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[:2] == (1, 3) and torch.isfinite(logits).all()


def test_speedrun_killed_in_pretraining_resumes_and_skips_finished_stages(corpus_slice: Path) -> None:
    args = ["speedrun", "--preset", "ci", "--data", str(corpus_slice), "--run", "kill", *FAST,
            "--set", "train.max_steps=60", "--set", "train.eval_every=20"]
    metrics = home.run_dir("kill") / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "nanoforge", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:] if proc.stdout else ""
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-2000:]
    assert "run the same command again" in out
    stopped_at = len(metrics.read_text().splitlines())
    assert 3 <= stopped_at < 60
    assert not (home.run_dir("kill") / "summary.json").exists()

    assert main(args) == 0
    stages = _stages("kill")
    assert all(stages[n]["skipped"] for n in ("data", "tokenizer", "tokenizer_eval", "tokenize"))
    assert not stages["pretrain"]["skipped"]
    assert "resuming pretraining" in (home.run_dir("kill") / "log.txt").read_text()
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 61))  # continued at the checkpoint, nothing repeated or lost
    summary = json.loads((home.run_dir("kill") / "summary.json").read_text())
    assert summary["steps"] == 60


def test_ablate_2x2_grid_shares_stages_and_resumes_cell_by_cell(
        corpus_slice: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grid = tmp_path / "grid.toml"
    grid.write_text(f"""
[base]
preset = "ci"
data = "{corpus_slice}"
set = ["train.max_steps=8", "train.eval_every=4", "eval.limit=4"]

[axes]
"tokenizer.backend" = ["rustbpe", "neox"]
"train.lr" = [1e-2, 5e-3]
""")
    import nanoforge.pipeline.ablate as ablate_mod

    real = ablate_mod.speedrun
    calls = []

    def crash_after_first_cell(*args: object, **kwargs: object) -> dict:
        calls.append(kwargs["run"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ablate_mod, "speedrun", crash_after_first_cell)
    assert main(["ablate", str(grid), "--name", "g"]) == 130
    monkeypatch.setattr(ablate_mod, "speedrun", real)
    records = home.home() / "pipeline"
    before = {p.name: p.stat().st_mtime_ns for p in records.glob("*.json")}
    expected = {"data", "tokenizer", "tokenizer_eval", "tokenize", "pretrain", "export"}
    assert {name.rsplit("-", 1)[0] for name in before} >= expected  # cell 1's stages

    assert main(["ablate", str(grid), "--name", "g"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in records.glob("*.json")}
    assert all(after[name] == mtime for name, mtime in before.items())  # nothing that finished reran
    kinds = [name.rsplit("-", 1)[0] for name in after]
    assert kinds.count("tokenizer") == 2 and kinds.count("tokenize") == 2 and kinds.count("data") == 1
    assert kinds.count("pretrain") == 4
    assert len(list((home.home() / "tokenizers").iterdir())) == 2

    out = home.run_dir("g")
    table = (out / "comparison.md").read_text().splitlines()
    assert table[0].startswith("| backend | lr |") and "val bpb" in table[0]
    rows = [line for line in table[2:] if line.startswith("|")]
    assert len(rows) == 4 and sum("**" in r for r in rows) >= 1
    assert (out / "val_bpb.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((out / "comparison.json").read_text())["rows"]) == 4

    # a third run finds every cell finished
    assert main(["ablate", str(grid), "--name", "g"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in records.glob("*.json")} == after


def test_speedrun_downloads_its_corpus_from_a_hub(tmp_path: Path, nanoforge_home: Path) -> None:
    """`--data hf:REPO:SHARDS` goes through huggingface_hub against a loopback Hub (HF_ENDPOINT)."""
    import threading

    from _data_helpers import documents
    from test_data_download import REPO, Hub, _parquet_bytes

    hub = Hub()
    threading.Thread(target=hub.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        hub.files.update({f"shard_{i:05d}.parquet": _parquet_bytes(documents(400, seed=i)) for i in range(2)})
        env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}", "HF_HUB_OFFLINE": "0",
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": "",
               "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1", "NANOFORGE_HOME": str(nanoforge_home)}
        r = subprocess.run([sys.executable, "-m", "nanoforge", "speedrun", "--preset", "ci", "--data",
                            f"hf:{REPO}:0-1", "--run", "hub", "--json", *FAST],
                           capture_output=True, text=True, env=env, timeout=600)
    finally:
        hub.shutdown()
        hub.server_close()
    assert r.returncode == 0, r.stderr[-3000:]
    corpus = home.corpus_dir(f"hf-{REPO.replace('/', '--')}")
    assert sorted(p.name for p in corpus.glob("*.parquet")) == ["shard_00000.parquet", "shard_00001.parquet"]
    assert sorted(name for name, _ in hub.gets) == ["shard_00000.parquet", "shard_00001.parquet"]
    summary = json.loads((home.run_dir("hub") / "summary.json").read_text())
    assert summary["data"] == f"hf:{REPO}:0-1" and math.isfinite(summary["val_bpb"])
