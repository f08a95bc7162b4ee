"""fp32 matrix products on the CPU through oneDNN, where oneDNN is faster than torch's default BLAS.

On the CPU, `torch.mm` and `F.linear` call MKL, and MKL uses its AVX-512 kernels only on Intel CPUs: on an
AMD EPYC with AVX-512 it runs AVX2 code at about half of the machine's fp32 peak. oneDNN, which every
PyTorch CPU build bundles (`torch.ops.mkldnn._linear_pointwise`), picks kernels by CPU feature, not by
vendor. It is the same IEEE fp32 arithmetic (no bf16 or tf32 shortcuts); only the summation order
differs, so results differ from MKL's in the last bits.

Which library to use is measured once per CPU, thread count and torch version (a 1024-cubed product each
way, after a warm-up) and kept in $NANOFORGE_HOME/cache/cpu_gemm.json, so every later run on the machine, a resumed
run included, does the same arithmetic. oneDNN is chosen only when it is at least 1.25× faster.
NANOFORGE_CPU_GEMM=onednn|torch overrides the measurement (read at each decision: a process that changes it
gets the library it names from then on).

`bf16_faster()` is the same kind of one-time measurement for `train.dtype = auto` on a CPU: bf16 products
against the faster fp32 library, kept in cache/cpu_bf16.json. CPUs with bf16 matrix units (Intel AMX,
~7× fp32 on a Sapphire Rapids core) or bf16 dot-product instructions (AVX512_BF16 on AMD Zen 4: 1.9×)
train under bf16 autocast; CPUs that emulate bf16 (AVX2, where it is ~4× *slower*) stay in fp32. bf16 is
chosen when its product is at least 1.5× faster, so that it also pays for the casts and the element-wise
work autocast leaves in fp32: on Zen 4, products 1.9× faster made a whole cpu-demo training step 1.47×
faster. NANOFORGE_CPU_BF16=bf16|fp32 overrides the measurement.

    y = linear(x, w)          # x @ w.T, differentiable; oneDNN on CPU fp32 when chosen, else F.linear
    c = mm_nt(a, b)           # a @ b.T   (no autograd)
    c = mm_nn(a, b)           # a @ b     (no autograd)
    c = mm_tn(a, b)           # a.T @ b   (no autograd)
    add_mm_tn_(c, a, b)       # c += a.T @ b
"""

from __future__ import annotations

import functools
import os
import platform
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanoforge import home
from nanoforge.errors import UserError

ENV = "NANOFORGE_CPU_GEMM"
MIN_SPEEDUP = 1.25
MEASURE_SIZE = 1024
MIN_ROWS = 4  # below this (one-token decoding) torch's GEMV has less overhead
BF16_ENV = "NANOFORGE_CPU_BF16"
BF16_MIN_SPEEDUP = 1.5

_choice: dict[tuple[int, str], bool] = {}  # (torch thread count, NANOFORGE_CPU_GEMM) -> the decision, in this process
_current = [False]  # the latest decision: what a graph traced by torch.compile keeps


def _onednn_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T through oneDNN, unconditionally (a [..., K], b [N, K], fp32 on the CPU)."""
    if torch.compiler.is_compiling():
        return _compiled_mm_nt(a, b)
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


# Under torch.compile the product is an opaque op (inductor's own lowering of _linear_pointwise expects a
# pre-packed inference weight); inductor still fuses everything around it.
@torch.library.custom_op("nanoforge::onednn_mm_nt", mutates_args=())
def _compiled_mm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


@_compiled_mm_nt.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty((*a.shape[:-1], b.shape[0]))


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def use_onednn() -> bool:
    """Whether CPU fp32 products go through oneDNN in this process (decided once per thread count, see the
    module doc). Under torch.compile it returns the decision made before compiling."""
    if torch.compiler.is_compiling():
        return _current[0]
    key = _key()
    choice = _choice.get(key)
    if choice is None:
        choice = _choice[key] = _decide(key[0])
    _current[0] = choice
    return choice


def set_onednn(flag: bool) -> None:
    """Fix the choice for this process (distributed ranks adopt rank 0's, so all do the same arithmetic)."""
    _choice[_key()] = _current[0] = bool(flag) and onednn_available()


def _key() -> tuple[int, str]:
    """What a decision depends on in this process: the torch thread count and NANOFORGE_CPU_GEMM."""
    return torch.get_num_threads(), os.environ.get(ENV, "auto")


def reset() -> None:
    """Forget this process's decisions (the next product decides again: cache file, variable or measurement)."""
    _choice.clear()


def _env(name: str, choices: tuple[str, str]) -> str:
    """auto or one of the two `choices` that the environment variable `name` names; anything else is refused."""
    value = os.environ.get(name, "auto").strip().lower()
    if value not in ("auto", *choices):
        raise UserError(f"{name}={value!r}: expected auto, {choices[0]} or {choices[1]}")
    return value


def _decide(threads: int) -> bool:
    env = _env(ENV, ("onednn", "torch"))
    if not onednn_available():
        return False
    if env != "auto":
        return env == "onednn"
    return _cached_choice(machine_key(threads))


def machine_key(threads: int | None = None) -> str:
    """What a measurement of this machine depends on: CPU model, torch thread count and torch version."""
    return f"{cpu_name()}|threads={threads or torch.get_num_threads()}|{torch.__version__}"


@functools.cache
def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux, where platform.processor() is often empty), so that one
    $NANOFORGE_HOME shared by machines with different CPUs keeps one measurement per CPU."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cached_choice(key: str) -> bool:
    known = home.read_cache("cpu_gemm")
    if isinstance(known.get(key), dict) and "onednn" in known[key]:
        return bool(known[key]["onednn"])
    t_torch, t_onednn = measure()
    choice = t_torch >= MIN_SPEEDUP * t_onednn
    flops = 2 * MEASURE_SIZE ** 3
    known[key] = {"onednn": choice, "torch_gflops": round(flops / t_torch / 1e9, 1),
                  "onednn_gflops": round(flops / t_onednn / 1e9, 1)}
    home.write_cache("cpu_gemm", known)
    return choice


def measure(size: int = MEASURE_SIZE, seconds: float = 0.2) -> tuple[float, float]:
    """Fastest time of a size³ fp32 product with torch (a @ b.T) and with oneDNN (inf without it)."""
    t = product_times(("torch", "onednn"), size, seconds)
    return t["torch"], t.get("onednn", float("inf"))


def product_times(kinds: tuple[str, ...], size: int = MEASURE_SIZE, seconds: float = 0.2) -> dict[str, float]:
    """Fastest time of a size³ product (a @ b.T) of each kind: `torch` (fp32), `onednn` (fp32, left out where
    oneDNN is missing), `bf16` (torch); in alternating bursts so that other load on the machine hits all
    alike and can only slow some bursts."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a16, b16 = a.bfloat16(), b.bfloat16()
    products = {"torch": lambda: a @ b.T, "onednn": lambda: _onednn_nt(a, b), "bf16": lambda: a16 @ b16.T}
    return _fastest({k: products[k] for k in kinds if k != "onednn" or onednn_available()}, seconds)


def bf16_faster(threads: int | None = None) -> bool:
    """Whether bf16 matrix products are at least BF16_MIN_SPEEDUP× faster than fp32 ones on this CPU (measured
    once per CPU, thread count and torch version; see the module doc), or what NANOFORGE_CPU_BF16 says."""
    env = _env(BF16_ENV, ("bf16", "fp32"))
    if env != "auto":
        return env == "bf16"
    key = machine_key(threads)
    known = home.read_cache("cpu_bf16")
    entry = known.get(key)
    if not (isinstance(entry, dict) and all(isinstance(entry.get(k), (int, float)) and entry[k] > 0
                                            for k in ("fp32_gflops", "bf16_gflops"))):
        t = product_times(("torch", "onednn", "bf16"))
        t32 = min(t["torch"], t.get("onednn", float("inf")))  # against the faster fp32 library
        flops = 2 * MEASURE_SIZE ** 3
        entry = known[key] = {"fp32_gflops": round(flops / t32 / 1e9, 1), "bf16_gflops": round(flops / t["bf16"] / 1e9, 1)}
        entry["bf16"] = _bf16_verdict(entry)  # for a reader of the file; the numbers decide
        home.write_cache("cpu_bf16", known)
    return _bf16_verdict(entry)


def _bf16_verdict(entry: dict[str, Any]) -> bool:
    """Decided from the measured numbers with today's threshold, so a cache written under another one is judged
    anew."""
    return entry["bf16_gflops"] >= BF16_MIN_SPEEDUP * entry["fp32_gflops"]


WARMUP_SECONDS = 0.3


def _fastest(fns: dict[str, Any], seconds: float = 0.2, warmup: float = WARMUP_SECONDS) -> dict[str, float]:
    """Fastest time of each function, run in alternating bursts for `seconds` (other load hits all alike)
    after `warmup` seconds of the same untimed. One warm-up call is not enough: in a fresh process MKL's
    first ~0.3 s of 1024³ products ran at 146–175 GFLOP/s against 187–199 later on a Zen 4, while oneDNN's
    were at full speed at once, so a measurement right at start-up found oneDNN up to 1.46× faster where it
    is 1.10–1.16×."""
    best = {name: float("inf") for name in fns}
    end = time.perf_counter() + warmup
    while True:
        for f in fns.values():
            f()
        if time.perf_counter() >= end:
            break
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or any(t == float("inf") for t in best.values()):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _eligible(*ts: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in ts) \
        and not torch.is_autocast_enabled("cpu") and use_onednn()


def mm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T for a [M, K], b [N, K]."""
    if a.shape[0] >= MIN_ROWS and _eligible(a, b):
        return _onednn_nt(a, b)
    return a @ b.T


def mm_nn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for a [M, K], b [K, N]."""
    if a.shape[0] >= MIN_ROWS and _eligible(a, b):
        return _onednn_nt(a, b.T)
    return a @ b


def mm_tn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a.T @ b for a [K, M], b [K, N] (a weight gradient: K is the number of tokens), contiguous [M, N]."""
    return _onednn_tn(a, b) if _eligible(a, b) else a.T @ b


def _onednn_tn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # oneDNN's product A @ B.T is fastest with the larger output side as B's rows.
    if a.shape[1] <= b.shape[1]:
        return _onednn_nt(a.T, b.T)
    return _onednn_nt(b.T, a.T).T.contiguous()


def add_mm_tn_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out += a.T @ b, in place (torch's addmm_ where oneDNN is not used: no temporary on a GPU)."""
    if _eligible(a, b):
        return out.add_(_onednn_tn(a, b))
    return out.addmm_(a.T, b)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return _onednn_nt(x, w)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, w = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = _onednn_nt(gy, w.T)
        if ctx.needs_input_grad[1]:
            gw = _onednn_tn(gy.reshape(-1, gy.shape[-1]), x.reshape(-1, x.shape[-1]))
        return gx, gw


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T (no bias) with autograd; oneDNN for CPU fp32 products of at least MIN_ROWS rows when chosen."""
    if x.numel() >= MIN_ROWS * x.shape[-1] and _eligible(x, w):
        return _Linear.apply(x, w)
    return F.linear(x, w)


class Linear(nn.Linear):
    """nn.Linear (no bias by default) whose product goes through `linear` (same parameters and state dict)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)
        return y if self.bias is None else y + self.bias
