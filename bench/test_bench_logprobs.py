"""pytest-benchmark suite for token_logprobs (logits input).

    python -m pytest bench/ --benchmark-only            # CPU-scaled sizes
    python -m pytest bench/ --benchmark-only -k "fp32 and fwd+bwd"

Uses the same providers as ``python -m fastdpo.bench`` (which adds peak-memory
accounting in fresh processes and writes the report); unavailable providers
are skipped with their reason.
"""

from __future__ import annotations

import pytest
import torch

from fastdpo.bench.providers import Case

CPU_SHAPES = [(2048, 32000), (512, 128256), (256, 262144)]
GPU_SHAPES = [(8192, 32000), (8192, 128256), (8192, 262144)]


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", range(3), ids=["32k", "128k", "256k"])
def test_token_logprobs(benchmark, provider, mode, dtype, shape, device):
    reason = provider.unavailable(device)
    if reason is not None:
        pytest.skip(f"{provider.name}: {reason.splitlines()[0]}")
    N, V = (GPU_SHAPES if device == "cuda" else CPU_SHAPES)[shape]
    step = provider.build(Case(N, V, dtype, mode, device))
    prepare = getattr(step, "prepare", None)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def setup():
        if prepare is not None:
            prepare()
        sync()

    def run():
        step()
        sync()

    benchmark.extra_info.update({"N": N, "V": V, "dtype": dtype, "mode": mode, "device": device})
    benchmark.pedantic(run, setup=setup, rounds=5, warmup_rounds=1)
