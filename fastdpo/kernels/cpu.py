"""Native CPU backend: C++ kernels in ``csrc/cpu``, registered as the CPU
implementation of the ``fastdpo::logprobs_*`` ops and of ``fastdpo::segment_sum``."""

from __future__ import annotations

import torch

from fastdpo import _build
from fastdpo.kernels._native import logprobs_bwd, logprobs_fwd, segment_sum  # noqa: F401  (the kernel contract)


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the cpu backend runs on CPU tensors only, got a {device.type} tensor"
    _build.load_extension("cpu")  # raises BuildError with the log path on failure
    return None

