"""pytest-benchmark suite for token_logprobs (logits input).

    python -m pytest bench/ --benchmark-only            # CPU-scaled sizes
    python -m pytest bench/ --benchmark-only -k "fp32 and fwd+bwd"

Uses the same providers as ``python -m fastdpo.bench`` (which adds peak-memory
accounting in fresh processes and writes the report); unavailable providers
are skipped with their reason.
"""

from __future__ import annotations

import pytest
from conftest import run_benchmark

from fastdpo.bench.providers import Case

# CPU sizes are scaled down to about the same number of logits (N * V ~ 65M).
CPU_SHAPES = [(2048, 32000), (512, 128256), (448, 152064), (256, 262144)]
GPU_SHAPES = [(8192, 32000), (8192, 128256), (8192, 152064), (8192, 262144)]


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", range(4), ids=["32k", "128k", "152k", "256k"])
def test_token_logprobs(benchmark, logprob_provider, mode, dtype, shape, device):
    provider = logprob_provider
    reason = provider.unavailable(device)
    if reason is not None:
        pytest.skip(f"{provider.name}: {reason.splitlines()[0]}")
    N, V = (GPU_SHAPES if device == "cuda" else CPU_SHAPES)[shape]
    step = provider.build(Case(N, V, dtype, mode, device))
    run_benchmark(benchmark, step, device, {"N": N, "V": V, "dtype": dtype, "mode": mode, "device": device})
