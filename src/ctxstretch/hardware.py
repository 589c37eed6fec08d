"""What this machine computes fast: native bf16, and its measured matmul peak (the yardstick of `bench_train` and of
the CPU time estimates)."""

from __future__ import annotations

import functools
import time

import torch


def bf16_native(device: str) -> bool:
    """True when `device` computes bf16 natively: a CUDA GPU reporting it, or a CPU with oneDNN bf16 support
    (AVX512-BF16 / AMX); an emulated bf16 would be slower than fp32."""
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def precision_for(device: str) -> str:
    """bf16 where it is native, fp32 elsewhere."""
    return "bf16" if bf16_native(device) else "fp32"


@functools.cache
def matmul_peak(dtype: str = "bf16", n: int = 2048, seconds: float = 0.5) -> float:
    """FLOP/s of the best of repeated n×n matmuls on the CPU, measured once per process."""
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    a @ b  # warm-up: thread pool, oneDNN kernels
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
