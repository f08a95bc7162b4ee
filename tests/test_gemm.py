"""CPU fp32 products through oneDNN (nanoforge/model/gemm.py): the same values and gradients as torch's own
matmul, the measured choice and its cache, the override, and the model under both libraries."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from nanoforge.errors import UserError
from nanoforge.model import LLaMA, ModelConfig, gemm

needs_onednn = pytest.mark.skipif(not gemm.onednn_available(), reason="this torch build has no oneDNN")


@pytest.fixture(autouse=True)
def fresh_choice(monkeypatch: pytest.MonkeyPatch):
    """Each test decides anew; the process's decision is restored afterwards."""
    saved_choice, saved_current = dict(gemm._choice), list(gemm._current)
    gemm.reset()
    monkeypatch.delenv(gemm.ENV, raising=False)
    yield
    gemm.reset()
    gemm._choice.update(saved_choice)
    gemm._current[:] = saved_current


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@needs_onednn
@pytest.mark.parametrize("shape", [(3, 37, 48, 80), (1, 256, 96, 40), (2, 5, 16, 300)])
def test_linear_matches_float64_reference_forward_and_backward(shape: tuple[int, int, int, int]) -> None:
    B, T, d_in, d_out = shape
    gemm.set_onednn(True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, d_in, generator=g, requires_grad=True)
    w = torch.randn(d_out, d_in, generator=g, requires_grad=True)
    gy = torch.randn(B, T, d_out, generator=g).transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous
    y = gemm.linear(x, w)
    assert y.grad_fn is not None and type(y.grad_fn).__name__.startswith("_Linear")
    y.backward(gy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = F.linear(x64, w64)
    y64.backward(gy.double())
    assert y.shape == (B, T, d_out)
    assert _rel(y, y64) < 1e-5
    assert _rel(x.grad, x64.grad) < 1e-5
    assert _rel(w.grad, w64.grad) < 1e-5
    assert w.grad.is_contiguous() and w.grad.shape == w.shape


@needs_onednn
@pytest.mark.parametrize("m,n", [(64, 300), (300, 64)])  # both ways of ordering the weight-gradient product
def test_products_match_torch(m: int, n: int) -> None:
    gemm.set_onednn(True)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(500, m, generator=g), torch.randn(500, n, generator=g)
    assert _rel(gemm.mm_tn(a, b), a.double().T @ b.double()) < 1e-5
    assert gemm.mm_tn(a, b).is_contiguous()
    acc = torch.ones(m, n)
    assert _rel(gemm.add_mm_tn_(acc, a, b), 1 + a.double().T @ b.double()) < 1e-5
    c, d = torch.randn(40, m, generator=g), torch.randn(n, m, generator=g)
    assert _rel(gemm.mm_nt(c, d), c.double() @ d.double().T) < 1e-5
    assert _rel(gemm.mm_nn(c, d.T.contiguous()), c.double() @ d.double().T) < 1e-5


def test_torch_choice_and_single_rows_never_call_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("oneDNN called")

    monkeypatch.setattr(gemm, "_onednn_nt", boom)
    x, w = torch.randn(2, 8, 16, requires_grad=True), torch.randn(12, 16, requires_grad=True)
    gemm.set_onednn(False)
    gemm.linear(x, w).sum().backward()
    gemm.mm_tn(torch.randn(9, 4), torch.randn(9, 5))
    acc = torch.zeros(4, 5)
    a, b = torch.randn(9, 4), torch.randn(9, 5)
    assert torch.allclose(gemm.add_mm_tn_(acc, a, b), a.T @ b, atol=1e-5)
    gemm.set_onednn(True)
    gemm.linear(torch.randn(1, 16), w)  # one row (decoding one token): torch's GEMV
    gemm.linear(x.double(), w.double())  # not fp32
    assert x.grad is not None


@needs_onednn
def test_choice_is_measured_once_and_cached(monkeypatch: pytest.MonkeyPatch, nanoforge_home) -> None:
    calls = []

    def fake_measure() -> tuple[float, float]:
        calls.append(1)
        return 0.020, 0.010  # torch 2× slower: oneDNN wins

    monkeypatch.setattr(gemm, "measure", fake_measure)
    assert gemm.use_onednn() is True
    assert gemm.use_onednn() is True and len(calls) == 1
    cache = nanoforge_home / "cache" / "cpu_gemm.json"
    entry = next(iter(json.loads(cache.read_text()).values()))
    assert entry["onednn"] is True and entry["onednn_gflops"] > entry["torch_gflops"]
    gemm.reset()
    assert gemm.use_onednn() is True and len(calls) == 1  # read back from the cache, not measured again


@needs_onednn
def test_broken_cache_is_measured_again(monkeypatch: pytest.MonkeyPatch, nanoforge_home) -> None:
    (nanoforge_home / "cache").mkdir(parents=True)
    (nanoforge_home / "cache" / "cpu_gemm.json").write_text("{not json")
    monkeypatch.setattr(gemm, "measure", lambda: (0.030, 0.010))
    assert gemm.use_onednn() is True
    assert json.loads((nanoforge_home / "cache" / "cpu_gemm.json").read_text())[gemm.machine_key()]["onednn"]


@needs_onednn
def test_small_speedup_keeps_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemm, "measure", lambda: (0.011, 0.010))  # 1.1×: below MIN_SPEEDUP
    assert gemm.use_onednn() is False


def test_env_override_and_bad_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemm, "measure", lambda: pytest.fail("measured despite the override"))
    monkeypatch.setenv(gemm.ENV, "torch")
    assert gemm.use_onednn() is False
    gemm.reset()
    monkeypatch.setenv(gemm.ENV, "mkl")
    with pytest.raises(UserError, match="NANOFORGE_CPU_GEMM='mkl': expected auto, onednn or torch"):
        gemm.use_onednn()


def _model(c: ModelConfig) -> LLaMA:
    torch.manual_seed(0)
    model = LLaMA(c)
    with torch.no_grad():  # non-zero residual outputs, so every weight gets a gradient
        for blk in model.layers:
            blk.attention.wo.weight.normal_(0, 0.05)
            blk.feed_forward.w2.weight.normal_(0, 0.05)
    return model


@needs_onednn
def test_model_loss_and_gradients_agree_across_libraries() -> None:
    c = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=160, vocab_size=300,
                    max_seq_len=32)
    model = _model(c)
    x, y = torch.randint(0, 300, (3, 32)), torch.randint(0, 300, (3, 32))
    out = {}
    for flag in (False, True):
        gemm.set_onednn(flag)
        model.zero_grad(set_to_none=True)
        loss = model(x, y)
        loss.backward()
        out[flag] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, model(x).detach())
    assert abs(out[True][0] - out[False][0]) < 1e-5
    assert (out[True][2] - out[False][2]).abs().max().item() < 1e-4
    for name, g in out[False][1].items():
        assert _rel(out[True][1][name], g) < 1e-4, name


@needs_onednn
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="torch.compile needs a C++ compiler")
def test_compiled_model_uses_the_same_products() -> None:
    c = ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16, ffn_dim=64, vocab_size=128,
                    max_seq_len=16)
    model = _model(c)
    x, y = torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))
    gemm.set_onednn(True)
    eager = model(x, y)
    eager.backward()
    g_eager = model.layers[0].feed_forward.w1.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model)(x, y)
    compiled.backward()
    assert abs(compiled.item() - eager.item()) < 1e-5
    g = model.layers[0].feed_forward.w1.weight.grad
    assert g.abs().max() > 0 and _rel(g, g_eager) < 1e-4


@needs_onednn
def test_changing_the_variable_in_the_process_takes_effect(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemm, "measure", lambda: pytest.fail("measured despite the variable"))
    monkeypatch.setenv(gemm.ENV, "torch")
    assert gemm.use_onednn() is False
    monkeypatch.setenv(gemm.ENV, "onednn")
    assert gemm.use_onednn() is True
    monkeypatch.setenv(gemm.ENV, "torch")
    assert gemm.use_onednn() is False


def test_the_measurement_times_each_product_only_after_it_has_warmed_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A library that runs slowly for its first few tenths of a second (MKL in a fresh process) must not lose
    the comparison for it: the timed bursts start after the warm-up, alternating as they do. On a simulated
    clock, so the test does not depend on the machine's load."""
    now = [0.0]
    first: dict[str, float] = {}
    monkeypatch.setattr(gemm.time, "perf_counter", lambda: now[0])

    def product(name: str, slow_for: float):
        def run() -> None:
            start = first.setdefault(name, now[0])
            now[0] += 0.004 if now[0] - start < slow_for else 0.0005
        return run

    best = gemm._fastest({"cold": product("cold", 0.15), "warm": product("warm", 0.0)}, seconds=0.1, warmup=0.2)
    assert best == pytest.approx({"cold": 0.0005, "warm": 0.0005})  # both at their warm speed
    first.clear()
    cold_start = gemm._fastest({"cold": product("cold", 0.5), "warm": product("warm", 0.0)}, seconds=0.1, warmup=0.2)
    assert cold_start == pytest.approx({"cold": 0.004, "warm": 0.0005})  # still cold when timed: it shows
