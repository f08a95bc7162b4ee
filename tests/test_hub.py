"""`nanoforge push` / `nanoforge pull` through huggingface_hub against a loopback Hub (tests/_hub_server.py):
push then pull gives byte-identical files for a tokenizer, an export (plus its model card) and parquet
shards; a nanochat bundle pulls and imports; a dropped transfer resumes; bad input is one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _eval_helpers import make_checkpoint, make_tokenizer
from _hub_server import HubServer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def hub() -> Iterator[HubServer]:
    server = HubServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def nf(hub: HubServer, tmp: Path, *args: str, token: str | None = None, home: Path | None = None
       ) -> subprocess.CompletedProcess:
    env = {**os.environ, **hub.env(tmp / "hf_home", token), "OMP_NUM_THREADS": "1"}
    if home is not None:
        env["NANOFORGE_HOME"] = str(home)
    # small read chunks, so a transfer dropped halfway has whole chunks on disk to resume from
    code = ("import sys, huggingface_hub.constants as c; c.DOWNLOAD_CHUNK_SIZE = 4096; "
            "from nanoforge.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=180)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_then_pull_a_tokenizer_is_byte_identical(hub: HubServer, tmp_path: Path, tok_path: Path) -> None:
    r = nf(hub, tmp_path, "push", str(tok_path), "me/de-tok", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kind"] == "tokenizer"
    assert hub.repos[("model", "me/de-tok")]["files"].keys() == files_of(tok_path).keys()
    other = tmp_path / "other_home"
    r = nf(hub, tmp_path, "pull", "me/de-tok", "--kind", "tokenizer", "--json", home=other)
    assert r.returncode == 0, r.stderr
    pulled = Path(json.loads(r.stdout)["path"])
    assert pulled == other / "tokenizers" / "de-tok"
    assert files_of(pulled) == files_of(tok_path)
    assert not [p for p in pulled.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_push_an_export_with_a_model_card_then_pull_resumes_a_dropped_transfer(hub: HubServer, tmp_path: Path,
                                                                                tok_path: Path) -> None:
    from nanoforge.export.hf import export_hf

    out = export_hf(make_checkpoint(tmp_path, tok_path), tmp_path / "export")
    r = nf(hub, tmp_path, "push", str(out), "me/de-tiny", "--private")
    assert r.returncode == 0, r.stderr
    repo = hub.repos[("model", "me/de-tiny")]
    assert repo["private"]
    card = repo["files"]["README.md"].decode()
    assert "`LlamaForCausalLM`" in card and "| parameters |" in card and "| steps | 10 |" in card
    hub.drop_once["model.safetensors"] = len(repo["files"]["model.safetensors"]) // 2
    r = nf(hub, tmp_path, "pull", "me/de-tiny", "--name", "tiny")
    assert r.returncode == 0, r.stderr
    pulled = Path(os.environ["NANOFORGE_HOME"]) / "exports" / "tiny"
    assert files_of(pulled) == {**files_of(out), "README.md": repo["files"]["README.md"]}
    ranges = [rng for m, p, rng in hub.requests if m == "GET" and p.endswith("/model.safetensors")]
    assert ranges[0] is None and any(r and r.startswith("bytes=") for r in ranges[1:])  # resumed, not restarted
    r = nf(hub, tmp_path, "pull", "me/de-tiny", "--name", "tiny")
    assert r.returncode == 2 and "already exists" in r.stderr


def test_push_then_pull_parquet_shards(hub: HubServer, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"text": [f"Dokument {i}.{j} über die Stadt" for j in range(50)]}),
                       corpus / f"shard_{i:05d}.parquet")
    r = nf(hub, tmp_path, "push", str(corpus), "me/corpus")
    assert r.returncode == 0, r.stderr
    assert ("dataset", "me/corpus") in hub.repos
    r = nf(hub, tmp_path, "pull", "me/corpus", "--kind", "dataset")
    assert r.returncode == 0, r.stderr
    assert files_of(Path(os.environ["NANOFORGE_HOME"]) / "corpora" / "corpus") == files_of(corpus)


def test_pull_a_nanochat_bundle_imports_it(hub: HubServer, tmp_path: Path, tok_path: Path) -> None:
    from test_interop import nanochat_state, write_nanochat

    from nanoforge.infer.engine import load_checkpoint
    from nanoforge.tokenizer import Tokenizer

    tok = Tokenizer.load(tok_path)
    folder = write_nanochat(tmp_path / "nc", tok, nanochat_state(tok.vocab_size), step=650)
    files = {**files_of(folder), **files_of(folder.parent.parent / "tokenizer"), "optim_000650_rank0.pt": b"x" * 99}
    hub.repos[("model", "karpathy/nanochat-d2")] = {"files": files, "private": False, "sha": "1" * 40}
    r = nf(hub, tmp_path, "pull", "karpathy/nanochat-d2", "--kind", "nanochat", "--phase", "sft", "--json")
    assert r.returncode == 0, r.stderr
    ckpt = Path(json.loads(r.stdout)["path"])
    assert ckpt == Path(os.environ["NANOFORGE_HOME"]) / "checkpoints" / "sft" / "nanochat-d2"
    model, tok2, meta = load_checkpoint(ckpt)
    assert meta["step"] == 650 and tok2.fingerprint == tok.fingerprint and model.config.mlp == "relu2"
    fetched = {p.rsplit("/", 1)[-1] for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p}
    assert "optim_000650_rank0.pt" not in fetched  # only what an import needs


@pytest.mark.parametrize("case", ["no_token", "bad_token", "missing_repo", "not_a_model", "nothing_to_push"])
def test_bad_input_is_one_line_exit_2(case: str, hub: HubServer, tmp_path: Path, tok_path: Path) -> None:
    if case == "not_a_model":
        hub.repos[("model", "me/gpt2")] = {"files": {"config.json": b'{"model_type": "gpt2"}'}, "private": False,
                                            "sha": "2" * 40}
    args = {"no_token": ["push", str(tok_path), "me/x"], "bad_token": ["push", str(tok_path), "me/x"],
            "missing_repo": ["pull", "me/nothing"], "not_a_model": ["pull", "me/gpt2"],
            "nothing_to_push": ["push", str(tmp_path), "me/x"]}[case]
    r = nf(hub, tmp_path, *args, token={"no_token": "", "bad_token": "hf_wrong"}.get(case))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    needle = {"no_token": "no Hugging Face token", "bad_token": "refused", "missing_repo": "not found",
              "not_a_model": "model_type 'gpt2'", "nothing_to_push": "nothing to push"}[case]
    assert needle in r.stderr
    assert not (Path(os.environ["NANOFORGE_HOME"]) / "exports" / "gpt2").exists()
