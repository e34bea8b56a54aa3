"""pytest-benchmark suite for per-token log-probs plus the token-level KL to the reference (RRPO, TDPO).

    python -m pytest bench/test_bench_kl.py --benchmark-only                 # quick set
    python -m pytest bench/test_bench_kl.py --benchmark-only --bench-full    # everything

Same providers as ``python -m fastdpo.bench`` (its ``kl`` suite); unavailable providers are skipped
with their reason.
"""

from __future__ import annotations

import pytest
from conftest import run_benchmark

from fastdpo.bench.providers import Case

SHAPES = {
    "cpu": [("32k", (1024, 32000)), ("128k", (256, 128256))],
    "cuda": [("32k", (8192, 32000)), ("128k", (8192, 128256))],
}
QUICK = dict(shapes=["32k"], dtypes=["fp32"], modes=["fwd+bwd"])
FULL = dict(shapes=["32k", "128k"], dtypes=["fp32", "bf16"], modes=["fwd", "bwd", "fwd+bwd"])


def test_token_kl(benchmark, kl_provider, mode, dtype, shape, device):
    reason = kl_provider.unavailable(device)
    if reason is not None:
        pytest.skip(f"{kl_provider.name}: {reason.splitlines()[0]}")
    N, V = shape
    step = kl_provider.build(Case(N, V, dtype, mode, device, kl=True))
    run_benchmark(benchmark, step, device, {"N": N, "V": V, "dtype": dtype, "mode": mode, "device": device, "kl": True})
