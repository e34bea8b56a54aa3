"""pytest-benchmark suite for DPO from hidden states + LM head (fused linear):
policy forward + backward and reference forward, as a trainer step runs them.

    python -m pytest bench/test_bench_linear.py --benchmark-only                 # quick set
    python -m pytest bench/test_bench_linear.py --benchmark-only --bench-full    # everything

Same providers as ``python -m fastdpo.bench`` (fastdpo, naive full logits, TRL's
ChunkedLogProbFunction, Liger's LigerFusedLinearDPOLoss, the 4-GEMM floor).
"""

from __future__ import annotations

import pytest
from conftest import run_benchmark

from fastdpo.bench.providers import Case

# (N tokens = 2 * pairs * 256, H, V); CPU sizes are scaled down. "small" keeps the quick CPU set short.
SHAPES = {
    "cpu": [("small", (512, 256, 32000)), ("32k", (2048, 512, 32000)), ("128k", (2048, 512, 128256)),
            ("152k", (1024, 512, 152064)), ("256k", (512, 512, 262144))],
    "cuda": [("small", (8192, 4096, 32000)), ("32k", (8192, 4096, 32000)), ("128k", (8192, 4096, 128256)),
             ("152k", (8192, 3584, 152064)), ("256k", (8192, 3584, 262144))],
}
QUICK = dict(shapes=["small"], dtypes=["fp32"], modes=["fwd+bwd"])
FULL = dict(shapes=["small", "32k", "128k", "152k", "256k"], dtypes=["fp32", "bf16"], modes=["fwd", "bwd", "fwd+bwd"])


def test_linear_dpo(benchmark, linear_provider, mode, dtype, shape, device):
    reason = linear_provider.unavailable(device)
    if reason is not None:
        pytest.skip(f"{linear_provider.name}: {reason.splitlines()[0]}")
    N, H, V = shape
    step = linear_provider.build(Case(N, V, dtype, mode, device, H=H))
    run_benchmark(benchmark, step, device, {"N": N, "H": H, "V": V, "dtype": dtype, "mode": mode, "device": device})
