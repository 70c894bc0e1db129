"""Which floating-point type is fast on this machine, measured rather than assumed.

CPUs differ: with AVX512-BF16 or AMX, oneDNN runs bf16 matmuls about twice as fast as fp32; on an
AVX2-only CPU the same bf16 matmul falls back to a slow path (seen here: 0.7 GFLOP/s against
fp32's 200, so bf16 made training steps 3x slower). The rule used by infer.py (`--dtype auto`) and
train.py (`trainer.precision: auto`):

  CUDA: bf16 where torch.cuda.is_bf16_supported(), else fp32.
  CPU:  bf16 only if oneDNN reports native bf16 AND a timed probe (a (64, 1024) x (1024, 1024)
        matmul, the encoder's shape at batch 1) runs at least 1.2x faster in bf16 than in fp32;
        else fp32. The probe takes a few milliseconds and runs once per process.
"""
import functools
import statistics
import time

import torch


def matmul_gflops(dtype: torch.dtype, m: int = 2048, n: int = 2048, k: int = 2048, runs: int = 5,
                  device="cpu") -> float:
    """Median rate of an (m, k) x (k, n) matmul over `runs` in GFLOP/s: the number printed beside
    every timing, since machines (and their bf16 support) differ from session to session."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b  # warm-up: the first call pays for kernel selection
    times = []
    for _ in range(runs):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t)
    return 2 * m * n * k / statistics.median(times) / 1e9


@functools.cache
def _cpu_bf16_is_fast() -> bool:
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False  # no native bf16: do not even time the slow path
    fp32 = matmul_gflops(torch.float32, 64, 1024, 1024, runs=7)
    bf16 = matmul_gflops(torch.bfloat16, 64, 1024, 1024, runs=7)
    return bf16 >= 1.2 * fp32


def fast_dtype(device="cpu") -> torch.dtype:
    """torch.bfloat16 where bf16 is measurably faster than fp32 on `device`, else torch.float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if _cpu_bf16_is_fast() else torch.float32
    return torch.float32
