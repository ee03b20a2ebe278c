"""What every benchmark here reports beside its ratios: the machine's matmul peak.

Benchmarks run as scripts (``python benchmarks/bench_x.py``), so this module is imported by
name from the ``benchmarks`` directory.
"""

from __future__ import annotations

import time

import torch

from amendlm.modeling import autocast


def matmul_peak_gflops(dtype: torch.dtype, size: int = 1536, seconds: float = 3.0) -> float:
    """Best GFLOP/s of a ``size``-square ``F.linear`` over about ``seconds`` (2·size³ FLOPs per call).

    fp32 runs on fp32 tensors; bf16 runs fp32 tensors under bf16 autocast, as amendlm does.
    """
    x, w = torch.randn(size, size), torch.randn(size, size)
    best, deadline, runs = 0.0, time.perf_counter() + seconds, 0
    with torch.inference_mode(), autocast(dtype):
        torch.nn.functional.linear(x, w)  # warm-up: kernel selection
        while time.perf_counter() < deadline or runs < 2:
            began = time.perf_counter()
            torch.nn.functional.linear(x, w)
            best = max(best, 2 * size**3 / (time.perf_counter() - began) / 1e9)
            runs += 1
    return best
