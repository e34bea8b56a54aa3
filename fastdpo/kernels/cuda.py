"""CUDA C++ backend: kernels in ``csrc/cuda``, registered as the CUDA
implementation of the ``fastdpo::logprobs_*`` ops (one op name per device)."""

from __future__ import annotations

import torch

from fastdpo import _build
from fastdpo.kernels._native import logprobs_bwd, logprobs_fwd  # noqa: F401  (the kernel contract)
# Per-sequence sums of packed batches ([tokens] floats, not the vocabulary pass): torch's segmented
# reduction on CUDA (deterministic), shared with the torch backend.
from fastdpo.kernels.reference import segment_sum  # noqa: F401  (the kernel contract)


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors only, got a {device.type} tensor"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if not torch.version.cuda:
        return "this torch is not a CUDA build"
    problem = _build.cuda_arch_problem(*torch.cuda.get_device_capability(device))
    if problem is not None:  # a GPU that should run it: "auto" warns when it falls back
        raise _build.UnsupportedGPUError(f"fastdpo: {problem}")
    if _build.cuda_home() is None:
        return "no CUDA toolkit found to build the extension (set CUDA_HOME or put nvcc on PATH)"
    _build.load_extension("cuda")  # raises BuildError with the log path on failure
    return None

