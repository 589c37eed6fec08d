"""What this machine computes fast: native bf16, its measured matmul peak (the yardstick of `bench_train`), and how
long a model's own training step takes here (the basis of the CPU time estimates)."""

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


def train_step_seconds(model: torch.nn.Module, length: int, precision: str, vocab: int, repeats: int = 1) -> float:
    """Seconds of one forward + backward of `model` (on the CPU) over one row of `length` random tokens, bf16
    autocast when `precision` is bf16: the best of `repeats` after one warm-up step. The optimizer's update is not
    included (for a 135M-parameter model it is < 1% of a 1K-token step)."""
    ids = torch.randint(0, vocab, (1, length))
    best = float("inf")
    for i in range(repeats + 1):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if i:
            best = min(best, time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
    return best
