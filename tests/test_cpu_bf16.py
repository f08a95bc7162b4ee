"""`train.dtype = auto` on a CPU: bf16 autocast exactly where the one-time measurement says bf16 products are
clearly faster, fp32 master weights and optimizer state, and a resumed run keeps its checkpoint's choice."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from nanoforge import home
from nanoforge.config import load_config
from nanoforge.errors import UserError
from nanoforge.model import gemm
from nanoforge.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def measured(monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` as a user has it: the measurement decides (the other tests pin fp32)."""
    monkeypatch.delenv(gemm.BF16_ENV, raising=False)

TEXT = ["Die Katze sitzt auf der Matte und schaut aus dem Fenster in den Garten.",
        "Heute regnet es in Berlin, morgen scheint vielleicht wieder die Sonne.",
        "Der Bundestag hat am Donnerstag ein neues Gesetz zur Energie beschlossen.",
        "Im Winter fällt in den Alpen viel Schnee, und die Straßen sind oft gesperrt."]


def _set_bf16_measurement(faster: bool) -> None:
    home.write_cache("cpu_bf16", {gemm.machine_key(): {"fp32_gflops": 100.0, "bf16_gflops": 300.0 if faster else 20.0}})


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    from nanoforge.data.tokenize import tokenize_corpus
    from nanoforge.tokenizer.train import train_tokenizer

    (tmp_path / "corpus").mkdir()
    pq.write_table(pa.table({"text": [f"{t} ({i})" for i in range(60) for t in TEXT]}),
                   tmp_path / "corpus" / "shard_00000.parquet")
    tok = train_tokenizer(tmp_path / "corpus", vocab_size=300, backend="rustbpe", out=tmp_path / "tok")
    return tokenize_corpus(tmp_path / "corpus", tok, out=tmp_path / "tokens", val_docs=8, workers=1)


def _train(tokens: Path, tag: str, dtype: str, resume: bool = False, optimizer: str = "adamw") -> dict:
    cfg = load_config(preset="ci", overrides=["train.max_steps=4", "train.save_every=2", "train.eval_every=0",
                                              f"train.dtype={dtype}", f"train.optimizer={optimizer}"])
    return train(cfg, tokens=str(tokens), tag=tag, resume=resume)


def _ckpt(tag: str, step: int) -> tuple[dict[str, torch.Tensor], dict]:
    folder = home.home() / "checkpoints" / "base" / tag
    return (load_file(str(folder / f"model_{step:06d}.safetensors")),
            json.loads((folder / f"meta_{step:06d}.json").read_text()))


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_auto_follows_the_measurement_keeps_fp32_masters_and_resume_keeps_the_choice(
        tokens: Path, optimizer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from nanoforge.train import optim

    ns_dtypes: list[torch.dtype] = []  # what Muon's Newton–Schulz computes in, run by run
    newton_schulz = optim.zeropower_via_newtonschulz5

    def spy(g: torch.Tensor, steps: int, bf16: bool) -> torch.Tensor:
        ns_dtypes.append(torch.bfloat16 if bf16 else torch.float32)
        return newton_schulz(g, steps, bf16)

    monkeypatch.setattr(optim, "zeropower_via_newtonschulz5", spy)

    def train_(tag: str, dtype: str, resume: bool = False) -> set[torch.dtype]:
        ns_dtypes.clear()
        _train(tokens, tag, dtype, resume, optimizer)
        return set(ns_dtypes)

    _set_bf16_measurement(True)
    ns = [train_("auto-bf16", "auto"), train_("bf16", "bfloat16"), train_("fp32", "float32")]
    assert ns == ([{torch.bfloat16}, {torch.bfloat16}, {torch.float32}] if optimizer == "muon" else [set()] * 3)
    w_auto, meta = _ckpt("auto-bf16", 4)
    assert meta["autocast"] == "bfloat16" and _ckpt("fp32", 4)[1]["autocast"] == "float32"
    assert _equal(w_auto, _ckpt("bf16", 4)[0]) and not _equal(w_auto, _ckpt("fp32", 4)[0])
    assert all(v.dtype == torch.float32 for v in w_auto.values())  # master weights stay fp32
    optim = torch.load(home.home() / "checkpoints" / "base" / "auto-bf16" / "optim_000004.pt", weights_only=True)
    moments = [t for s in optim["state"].values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
    assert moments and all(t.dtype == torch.float32 for t in moments)

    _set_bf16_measurement(False)  # the machine now measures otherwise: a new run is fp32 ...
    train_("auto-fp32", "auto")
    assert _equal(_ckpt("auto-fp32", 4)[0], _ckpt("fp32", 4)[0])
    folder = home.home() / "checkpoints" / "base" / "auto-bf16"
    for name in ("model_000004.safetensors", "meta_000004.json", "optim_000004.pt"):
        (folder / name).unlink()
    resumed = train_("auto-bf16", "auto", resume=True)  # ... but the resumed bf16 run stays bf16, bit for bit
    assert _equal(_ckpt("auto-bf16", 4)[0], w_auto) and resumed == ns[0]


def test_the_bf16_measurement_is_made_once_and_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    first = gemm.bf16_faster()
    cached = home.read_cache("cpu_bf16")[gemm.machine_key()]
    assert cached["bf16"] == first and cached["fp32_gflops"] > 0 and cached["bf16_gflops"] > 0
    assert first == cached["bf16"] == (cached["bf16_gflops"] >= gemm.BF16_MIN_SPEEDUP * cached["fp32_gflops"])
    monkeypatch.setattr(gemm, "_fastest", lambda *a, **k: pytest.fail("measured again"))
    assert gemm.bf16_faster() == first


def test_the_environment_overrides_the_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    _set_bf16_measurement(False)
    monkeypatch.setenv(gemm.BF16_ENV, "bf16")
    assert gemm.bf16_faster()
    _set_bf16_measurement(True)
    monkeypatch.setenv(gemm.BF16_ENV, "fp32")
    assert not gemm.bf16_faster()
    monkeypatch.setenv(gemm.BF16_ENV, "fast")
    with pytest.raises(UserError, match="NANOFORGE_CPU_BF16='fast': expected auto, bf16 or fp32"):
        gemm.bf16_faster()


def test_a_cached_measurement_is_judged_by_the_current_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache written when the threshold was 2× (its "bf16": false) is decided again from its numbers; an
    entry without them is measured anew."""
    home.write_cache("cpu_bf16", {gemm.machine_key(): {"bf16": False, "fp32_gflops": 210.0, "bf16_gflops": 396.0}})
    assert gemm.bf16_faster()  # 1.89×
    home.write_cache("cpu_bf16", {gemm.machine_key(): {"bf16": True, "fp32_gflops": 210.0, "bf16_gflops": 250.0}})
    assert not gemm.bf16_faster()
    home.write_cache("cpu_bf16", {gemm.machine_key(): {"bf16": True}})
    monkeypatch.setattr(gemm, "_fastest", lambda fns, *a: {name: 1.0 for name in fns})  # bf16 no faster
    assert not gemm.bf16_faster()
    assert home.read_cache("cpu_bf16")[gemm.machine_key()]["bf16"] is False
