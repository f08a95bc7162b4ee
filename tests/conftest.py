"""Shared fixtures: an isolated $NANOFORGE_HOME per test and the shared real-text corpus."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

# A test run started in the background of a non-interactive shell (`cmd &`) inherits SIGINT ignored (POSIX),
# and so would every process the tests start; the tests that press Ctrl-C need it delivered.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CORPUS = SHARED / "corpus"


@pytest.fixture(scope="session")
def cpu_gemm(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The CPU GEMM library this machine uses (nanoforge/model/gemm.py), measured once for the session, or
    the one NANOFORGE_CPU_GEMM names (`NANOFORGE_CPU_GEMM=torch make test` tests the other path)."""
    from nanoforge.model import gemm

    if os.environ.get("NANOFORGE_CPU_GEMM", "auto") in ("onednn", "torch"):
        return os.environ["NANOFORGE_CPU_GEMM"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOFORGE_HOME", str(tmp_path_factory.mktemp("gemm_home")))
        mp.delenv("NANOFORGE_CPU_GEMM", raising=False)
        return "onednn" if gemm.use_onednn() else "torch"


@pytest.fixture(autouse=True)
def nanoforge_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, cpu_gemm: str) -> Path:
    """Every test gets its own empty data home, so nothing touches the user's ~/.cache/nanoforge. The
    session's GEMM choice is passed on to child processes (torchrun ranks, CLI runs), so that runs a test
    compares bit for bit do the same arithmetic even if a fresh measurement in a busy child came out
    differently."""
    from nanoforge.model import gemm

    home = tmp_path_factory.mktemp("nanoforge_home")
    monkeypatch.setenv("NANOFORGE_HOME", str(home))
    monkeypatch.setenv("NANOFORGE_CPU_GEMM", cpu_gemm)
    # `train.dtype = auto` trains in fp32 here whatever the CPU: the tests compare with fp32 oracles (HF, TRL,
    # hand-computed gradients); tests/test_cpu_bf16.py unsets this to test the measured choice.
    monkeypatch.setenv("NANOFORGE_CPU_BF16", "fp32")
    # This process decides anew too: a decision an earlier test fixed (set_onednn, as torchrun ranks do)
    # must not make an in-process run differ from its subprocesses in the last bits.
    gemm.reset()
    return home


def _corpus(lang: str) -> Path:
    path = CORPUS / lang
    if not path.is_dir():
        pytest.skip(f"needs the shared corpus at {path} (absent in a plain clone)")
    return path


@pytest.fixture
def corpus_de() -> Path:
    """../shared/corpus/de: 2 parquet shards, 4,754 German documents, 11.1M characters."""
    return _corpus("de")


@pytest.fixture
def corpus_en() -> Path:
    """../shared/corpus/en: 2 parquet shards, 1,412 English documents, 14.3M characters."""
    return _corpus("en")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and when other jobs share the CPU OpenMP's
    spin-waiting makes small ops crawl; modules opt in with `pytestmark = usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
