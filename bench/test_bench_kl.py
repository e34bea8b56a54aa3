"""pytest-benchmark suite for per-token log-probs plus the token-level KL to the reference (RRPO, TDPO).

    python -m pytest bench/test_bench_kl.py --benchmark-only

Same providers as ``python -m fastdpo.bench`` (its ``kl`` suite); unavailable providers are skipped
with their reason.
"""

from __future__ import annotations

import pytest
from conftest import run_benchmark

from fastdpo.bench.providers import Case

CPU_SHAPES = [(1024, 32000), (256, 128256)]
GPU_SHAPES = [(8192, 32000), (8192, 128256)]


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", range(2), ids=["32k", "128k"])
def test_token_kl(benchmark, kl_provider, mode, dtype, shape, device):
    reason = kl_provider.unavailable(device)
    if reason is not None:
        pytest.skip(f"{kl_provider.name}: {reason.splitlines()[0]}")
    N, V = (GPU_SHAPES if device == "cuda" else CPU_SHAPES)[shape]
    step = kl_provider.build(Case(N, V, dtype, mode, device, kl=True))
    run_benchmark(benchmark, step, device, {"N": N, "V": V, "dtype": dtype, "mode": mode, "device": device, "kl": True})
