"""Helpers shared by the benchmarks: machine description, matmul FLOP/s, FLOP counting, peak memory."""

from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {torch.get_num_threads()} threads, {gpu}, torch {torch.__version__}"


def matmul_flops(dtype: torch.dtype, device: str = "cpu", n: int = 2048, seconds: float = 2.0) -> float:
    """Dense n x n matmul throughput in FLOP/s (2 n^3 per product), the ceiling the model is compared with."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device != "cpu":
        torch.cuda.synchronize()
    return 2 * n**3 * count / (time.perf_counter() - start)


def count_flops(fn, *args) -> int:
    """FLOPs of one call, counted by torch's dispatcher (matmuls and convolutions: 2 per multiply-add)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, *, warmup: int = 1, min_seconds: float = 3.0, min_calls: int = 2) -> float:
    """Seconds per call, averaged over at least `min_calls` calls and `min_seconds`."""
    for _ in range(warmup):
        fn()
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_seconds:
        fn()
        calls += 1
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls


def env_threads() -> int:
    return int(os.environ.get("AEFLOW_THREADS", torch.get_num_threads()))


def emit_table(table: str, out: str | None) -> None:
    """Print a benchmark's Markdown table and, with `out`, write it there too (folders made as needed)."""
    print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(table + "\n")
