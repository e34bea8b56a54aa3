"""pytest-benchmark suite for token_logprobs (logits input).

    python -m pytest bench/ --benchmark-only                  # the quick set (the README's shape)
    python -m pytest bench/ --benchmark-only --bench-full     # every shape, dtype and mode
    python -m pytest bench/ --benchmark-only -k "fp32 and fastdpo"

Uses the same providers as ``python -m fastdpo.bench`` (which adds peak-memory
accounting in fresh processes and writes the report); unavailable providers
are skipped with their reason.
"""

from __future__ import annotations

import pytest
from conftest import run_benchmark

from fastdpo.bench.providers import Case

# CPU sizes are scaled down to about the same number of logits (N * V ~ 65M).
SHAPES = {
    "cpu": [("32k", (2048, 32000)), ("128k", (512, 128256)), ("152k", (448, 152064)), ("256k", (256, 262144))],
    "cuda": [("32k", (8192, 32000)), ("128k", (8192, 128256)), ("152k", (8192, 152064)), ("256k", (8192, 262144))],
}
QUICK = dict(shapes=["32k"], dtypes=["fp32"], modes=["fwd+bwd"])
FULL = dict(shapes=["32k", "128k", "152k", "256k"], dtypes=["fp32", "bf16"], modes=["fwd", "bwd", "fwd+bwd"])


def test_token_logprobs(benchmark, logprob_provider, mode, dtype, shape, device):
    provider = logprob_provider
    reason = provider.unavailable(device)
    if reason is not None:
        pytest.skip(f"{provider.name}: {reason.splitlines()[0]}")
    N, V = shape
    step = provider.build(Case(N, V, dtype, mode, device))
    run_benchmark(benchmark, step, device, {"N": N, "V": V, "dtype": dtype, "mode": mode, "device": device})
