"""Shared fixtures: an isolated $NANOFORGE_HOME per test and the shared real-text corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CORPUS = SHARED / "corpus"


@pytest.fixture(autouse=True)
def nanoforge_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty data home, so nothing touches the user's ~/.cache/nanoforge."""
    home = tmp_path_factory.mktemp("nanoforge_home")
    monkeypatch.setenv("NANOFORGE_HOME", str(home))
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
