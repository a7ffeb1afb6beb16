"""GPU timing with CUDA events: warm-up, an L2 flush before every repetition,
median and spread. CPU timing is left to pytest-benchmark's own rounds."""

from __future__ import annotations

import statistics
from typing import Callable

import torch

_L2_FLUSH_BYTES = 512 * 2**20


def gpu_time_ms(fn: Callable[[], object], warmup: int = 5, reps: int = 30) -> dict:
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "stdev_ms": statistics.pstdev(times), "reps": reps}


def copy_bandwidth_gbs(device: str, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device (or memory-to-memory on the CPU) copy bandwidth,
    counting bytes read + bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    if device == "cuda":
        ms = gpu_time_ms(lambda: dst.copy_(src), warmup=3, reps=10)["median_ms"]
    else:
        import time

        dst.copy_(src)
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            dst.copy_(src)
            runs.append(time.perf_counter() - t0)
        ms = min(runs) * 1e3
    return 2 * nbytes / (ms * 1e-3) / 1e9
