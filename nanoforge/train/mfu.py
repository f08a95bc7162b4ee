"""Model FLOPs utilisation: achieved training FLOPs / the device's peak.

GPU peaks come from a table of dense bf16 tensor-core numbers (datasheets); on a CPU the peak is measured
with a large fp32 matmul, the faster of torch's and oneDNN's, or a bf16 matmul for a run under bf16
autocast (once per process), and the highest measurement so far is kept in
$NANOFORGE_HOME/cache/cpu_peak_flops.json per CPU, thread count, torch version and dtype.
"""

from __future__ import annotations

import torch

from nanoforge import home
from nanoforge.model import gemm

# Dense bf16 peak FLOP/s; matched against torch.cuda.get_device_name() in order (longest names first).
GPU_PEAK_FLOPS = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A10G", 125e12), ("A10", 125e12), ("L40S", 362e12), ("L40", 181e12),
    ("L4", 121e12), ("A6000", 155e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12),
    ("T4", 65e12),
]


def peak_flops(device: torch.device | str, autocast: torch.dtype | None = None) -> float | None:
    """Peak FLOP/s of one device for a run in fp32 or under `autocast`, or None when unknown (MFU is then
    not reported)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS:
            if key in name:
                return flops
        return None
    if device.type == "cpu":
        return cpu_peak_flops(bf16=autocast == torch.bfloat16)
    return None


_measured: dict[str, float] = {}


def cpu_peak_flops(size: int = 1024, seconds: float = 0.3, bf16: bool = False) -> float:
    """fp32 (or bf16) matmul FLOP/s of this CPU with torch's current thread count: the best of a few bursts,
    measured once per process and combined with the best earlier measurement, kept in the on-disk cache.
    Other jobs on the machine can only lower a measurement, and a too-low peak inflates MFU, so the cache
    keeps the highest."""
    key = gemm.machine_key() + ("|bf16" if bf16 else "")
    if key in _measured:
        return _measured[key]
    known = home.read_cache("cpu_peak_flops")
    best = _measure_matmul(size, seconds, bf16)
    before = float(known.get(key, 0.0))
    flops = _measured[key] = max(best, before)
    if best > before:
        home.write_cache("cpu_peak_flops", {**known, key: best})
    return flops


def _measure_matmul(size: int, seconds: float, bf16: bool = False) -> float:
    """The faster of torch's matmul and oneDNN's (see nanoforge.model.gemm): the machine's peak is what its
    best fp32 GEMM reaches, whichever library a model happens to call; for bf16, torch's bf16 matmul."""
    if bf16:
        return 2 * size ** 3 / gemm.product_times(("bf16",), size, seconds)["bf16"]
    return 2 * size ** 3 / min(gemm.measure(size, seconds))
