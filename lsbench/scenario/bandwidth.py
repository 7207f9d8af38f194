"""A device's memory copy bandwidth, the roofline's peak. Imports torch only: on CPU it runs
in a child process (`accounting.peak_gbps`), whose start-up is then a torch import."""

from __future__ import annotations

import math
import time

import torch

# Copy sizes well past the last-level cache (this CPU's L3 is 260 MiB; an H200's L2 is 60 MB).
COPY_BYTES = {"cpu": 512 << 20, "cuda": 1 << 30}


def measure_copy_gbps(device: torch.device | str, nbytes: int | None = None,
                      repeats: int = 5) -> float:
    """Best-of-`repeats` memory copy bandwidth of `device` in GB/s, in this process. A copy of
    n bytes moves 2n (read + write), counted as STREAM's copy and CUDA's bandwidthTest count
    it. The device is synchronised around every timed copy."""
    dev = torch.device(device)
    n = (nbytes or COPY_BYTES.get(dev.type, COPY_BYTES["cpu"])) // 4
    src = torch.ones(n, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)  # faults the destination's pages in: not timed
    best = math.inf
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # leave no reserved memory behind for the peak-memory columns
    return 2 * n * 4 / best / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Square matmuls big enough to reach the device's peak, small enough to measure in seconds.
MATMUL_SIZE = {"cpu": 1024, "cuda": 8192}


def measure_matmul_gflops(device: torch.device | str, dtype: torch.dtype = torch.float32,
                          n: int | None = None, repeats: int = 5) -> float:
    """Best-of-`repeats` rate of an n x n by n x n matmul in `dtype` on `device`, in GFLOP/s
    (2 n^3 FLOPs: a multiply and an add per multiply-accumulate): the compute roof of the
    batched roofline, as the copy bandwidth is its memory roof."""
    dev = torch.device(device)
    n = n or MATMUL_SIZE.get(dev.type, MATMUL_SIZE["cpu"])
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    out = a @ b  # the first call picks kernels and allocates: not timed
    best = math.inf
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    del a, b, out
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * n**3 / best / 1e9
