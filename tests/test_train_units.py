"""Training building blocks without data: schedules, Muon, optimizer groups, checkpoints, MFU."""

from __future__ import annotations

import json

import pytest
import torch

from nanoforge import checkpoint as ckpt
from nanoforge.cli import main
from nanoforge.config import load_config
from nanoforge.errors import UserError
from nanoforge.model import LLaMA, ModelConfig, gemm
from nanoforge.train.optim import MuonAdamW, build_optimizer, lr_multiplier, zeropower_via_newtonschulz5

TINY = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64, vocab_size=50,
                   max_seq_len=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_schedules_warm_up_then_decay_to_min() -> None:
    kw = dict(warmup_steps=10, min_lr_frac=0.1)
    assert lr_multiplier(0, 100, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_multiplier(99, 100, schedule="cosine", **kw) == pytest.approx(0.1, abs=1e-3)
    assert lr_multiplier(55, 100, schedule="linear", **kw) == pytest.approx(0.55)
    assert lr_multiplier(50, 100, schedule="wsd", cooldown_frac=0.2, **kw) == 1.0
    assert lr_multiplier(89, 100, schedule="wsd", cooldown_frac=0.2, **kw) == pytest.approx(0.55)
    assert lr_multiplier(99, 100, schedule="wsd", cooldown_frac=0.2, **kw) == pytest.approx(0.1)
    assert lr_multiplier(99, 100, schedule="constant", **kw) == 1.0


def test_newton_schulz_orthogonalises() -> None:
    torch.manual_seed(0)
    for shape in ((64, 32), (32, 64)):
        g = torch.randn(*shape)
        fp32, bf16 = zeropower_via_newtonschulz5(g), zeropower_via_newtonschulz5(g, bf16=True)
        for x in (fp32, bf16):
            s = torch.linalg.svdvals(x)
            assert x.dtype == torch.float32 and s.min() > 0.5 and s.max() < 1.3
        # bf16 arithmetic (a run under bf16 autocast), not fp32 rounded at the end: a few percent apart
        assert 1e-3 < ((bf16 - fp32).norm() / fp32.norm()).item() < 0.06
        assert not torch.equal(bf16, fp32.bfloat16().float())


def test_muon_groups_take_block_matrices_and_adamw_the_rest() -> None:
    cfg = load_config(preset="ci", overrides=["train.optimizer=muon"])
    model = LLaMA(TINY)
    opt = build_optimizer(model, cfg.train)
    assert isinstance(opt, MuonAdamW)
    muon = {id(p) for g in opt.param_groups if g["kind"] == "muon" for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in muon) == (name.startswith("layers.") and p.dim() == 2), name


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_optimizers_learn_and_resume_from_state_dict_exactly(optimizer: str) -> None:
    cfg = load_config(preset="ci", overrides=[f"train.optimizer={optimizer}", "train.lr=3e-3"])
    torch.manual_seed(0)
    data = torch.randint(0, 50, (4, 16))

    def steps(model: LLaMA, opt: torch.optim.Optimizer, n: int) -> list[float]:
        losses = []
        for _ in range(n):
            loss = model(data[:, :-1], data[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    torch.manual_seed(1)
    a = LLaMA(TINY)
    opt_a = build_optimizer(a, cfg.train)
    losses = steps(a, opt_a, 12)
    assert losses[-1] < losses[0] - 0.5
    torch.manual_seed(1)
    b = LLaMA(TINY)
    opt_b = build_optimizer(b, cfg.train)
    steps(b, opt_b, 6)
    c = LLaMA(TINY)
    c.load_state_dict(b.state_dict())
    opt_c = build_optimizer(c, cfg.train)
    opt_c.load_state_dict(opt_b.state_dict())
    assert steps(c, opt_c, 6) == losses[6:]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def _save(folder, step, model, val_bpb=None):
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)).backward()
    opt.step()
    return ckpt.save_checkpoint(folder, step, model, opt, {"model_config": model.config.to_dict(), "val_bpb": val_bpb})


def test_checkpoint_round_trip_and_optimizer_loads_weights_only(tmp_path) -> None:
    model = LLaMA(TINY)
    path = _save(tmp_path / "base" / "t", 5, model)
    assert path.name == "model_000005.safetensors"
    loaded, meta = ckpt.load_model(tmp_path / "base" / "t")
    assert meta["step"] == 5 and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert ckpt.load_model(path)[1]["step"] == 5
    state = ckpt.load_optimizer_state(tmp_path / "base" / "t", 5)
    assert "state" in state and "param_groups" in state


def test_torn_checkpoints_are_one_line_user_errors(tmp_path) -> None:
    folder = tmp_path / "t"
    model = LLaMA(TINY)
    _save(folder, 1, model)
    _save(folder, 2, model)
    with open(folder / "model_000002.safetensors", "r+b") as f:  # a write cut short
        f.truncate(100)
    with pytest.raises(UserError, match="step 2 is torn: model file model_000002.safetensors is 100 bytes"):
        ckpt.load_model(folder)
    (folder / "meta_000002.json").unlink()
    with pytest.raises(UserError, match="incomplete .torn write: no meta_000002.json"):
        ckpt.load_model(folder)
    assert ckpt.load_model(folder, step=1)[1]["step"] == 1  # nothing lost
    with open(folder / "optim_000001.pt", "wb") as f:
        f.write(b"garbage")
    with pytest.raises(UserError, match="optimizer state"):
        ckpt.load_optimizer_state(folder, 1)


def test_prune_keeps_last_k_and_the_best(tmp_path) -> None:
    model = LLaMA(TINY)
    for step, bpb in [(1, 2.0), (2, 1.0), (3, 1.5), (4, 1.6), (5, 1.7)]:
        _save(tmp_path, step, model, bpb)
    assert ckpt.prune_checkpoints(tmp_path, keep_last=2) == [1, 3]
    assert ckpt.checkpoint_steps(tmp_path) == [2, 4, 5]
    assert not (tmp_path / "optim_000001.pt").exists()


def test_checkpoints_list_and_resolve_by_tag_name(nanoforge_home, capsys) -> None:
    model = LLaMA(TINY)
    _save(nanoforge_home / "checkpoints" / "base" / "demo", 7, model, 1.234)
    assert ckpt.resolve_checkpoint("demo") == (nanoforge_home / "checkpoints" / "base" / "demo", 7)
    rows = ckpt.list_checkpoints()
    assert [(r["phase"], r["tag"], r["step"], r["val_bpb"]) for r in rows] == [("base", "demo", 7, 1.234)]
    assert main(["checkpoints", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["tag"] == "demo"
    assert main(["checkpoints", "list"]) == 0
    assert "1.2340" in capsys.readouterr().out
    with pytest.raises(UserError, match="does not exist"):
        ckpt.resolve_checkpoint("nope")


def test_resume_shape_mismatch_is_a_user_error() -> None:
    small, other = LLaMA(TINY), LLaMA(ModelConfig(**{**TINY.to_dict(), "d_model": 48}))
    with pytest.raises(UserError, match="does not match the model shape"):
        ckpt.load_weights(other, small.state_dict(), where="x")


def test_cpu_peak_flops_cache_keeps_the_highest_measurement(nanoforge_home, monkeypatch) -> None:
    """A measurement taken under load is lower; the cache must not let it replace a better one."""
    from nanoforge.train import mfu
    from nanoforge.train.mfu import cpu_peak_flops

    mfu._measured.clear()
    first = cpu_peak_flops(size=256, seconds=0.05)
    assert first > 1e8
    cache = nanoforge_home / "cache" / "cpu_peak_flops.json"
    assert list(json.loads(cache.read_text()).values()) == [first]
    assert cpu_peak_flops(size=256, seconds=0.05) == first  # once per process
    mfu._measured.clear()
    monkeypatch.setattr(mfu, "_measure_matmul", lambda size, seconds, bf16: first / 2)  # a busy machine
    assert cpu_peak_flops() == first
    assert list(json.loads(cache.read_text()).values()) == [first]
    mfu._measured.clear()
    monkeypatch.setattr(mfu, "_measure_matmul", lambda size, seconds, bf16: first * 2)  # a quiet one
    assert cpu_peak_flops() == first * 2
    assert list(json.loads(cache.read_text()).values()) == [first * 2]


def test_cpu_peak_flops_under_bf16_autocast_is_the_bf16_products_peak(nanoforge_home) -> None:
    """A run under CPU bf16 autocast is measured against what bf16 products reach, kept apart from fp32's."""
    from nanoforge.train import mfu

    mfu._measured.clear()
    fp32 = mfu.peak_flops("cpu")
    bf16 = mfu.peak_flops("cpu", torch.bfloat16)
    known = json.loads((nanoforge_home / "cache" / "cpu_peak_flops.json").read_text())
    assert known == {gemm.machine_key(): fp32, gemm.machine_key() + "|bf16": bf16} and bf16 > 1e8 and bf16 != fp32
